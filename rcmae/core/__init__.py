"""The ground floor every job stands on: configs and the command line (``config``, ``launcher``, ``run``),
processes and signals (``distributed``, ``preemption``), the data package (``data``), the training frame
(``engine``: the step, hooks, event storage, the loop; ``trainer``: the jobs' common skeleton), optimizers
(``optim``), schedules, evaluation and k-NN, the ViT size registry (``vit``), figures (``plotting``) and
checkpoints (``checkpoint``).

The method lives in :mod:`rcmae.pretrain`. What the ground floor knows of it is the *file formats* every
job reads: ``checkpoint`` parses the pretraining checkpoints of this toolkit, MAE and RC-MAE (their
``student`` / ``teacher`` / ``model`` entries, MAE key names) so that fine-tuning, detection and the
robustness suite load them without importing the method. Imports only point down, as the import-linter
contracts in ``pyproject.toml`` require (``tests/test_architecture.py``)."""
