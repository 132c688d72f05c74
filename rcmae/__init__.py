"""RC-MAE toolkit: MAE pretraining with an EMA teacher, and the downstream suite.

One import namespace, mapped onto the repository's folders: ``rcmae.core`` (the ground floor every
package stands on), ``rcmae.pretrain`` (the method), ``rcmae.finetune``, ``rcmae.detection``,
``rcmae.robustness``, ``rcmae.tools`` (the command lines) and ``rcmae.configs`` (shipped configs).
"""
__version__ = "0.2.0"


def load_model(path, model=None, which="auto"):
    """Any supported checkpoint as a model in one call (see :mod:`rcmae.api`)."""
    from rcmae.api import load_model as load

    return load(path, model, which)
