"""The ground floor every package stands on: configs and the command line, processes and devices,
checkpoints (ours and the official formats), data pipelines, the training step, evaluation, k-NN,
schedules, the ViT size registry and the demo data. Nothing here knows the method; imports only
point down from the packages above (pretrain, finetune, detection, robustness, tools)."""
