"""Fine-tuning, linear-probing and k-NN defaults: the ViT-B recipes (what a run without --config-file trains)."""
from rcmae.core.defaults import KNN_DEFAULTS

# MAE's (and RC-MAE's) ViT-B/16 fine-tuning recipe (configs/finetune/{mae,rcmae}_vit_base.yaml): what
# tools/finetune.py runs without --config-file.
DEFAULTS = {
    "model": {"arch": "vit_base_patch16", "img_size": 224, "global_pool": "avg", "drop_path": 0.1,
              "head_init_std": 2.0e-5},
    "init": {"checkpoint": None, "which": "auto"},
    "data": {"source": "folder", "train_path": None, "val_path": None, "label_space": "folder",
             "num_workers": 10, "crop_pct": None,
             # label-efficient runs: a class-balanced fraction of train (seeded), or an image list
             # (configs/subsets/imagenet_{1,10}percent.txt.gz: SimCLR's); null: every training image
             "label_fraction": None, "subset_file": None, "subset_seed": 0},
    "aug": {"rand_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0,
            "smoothing": 0.1},
    "optim": {"name": "adamw", "batch_size": 1024, "base_lr": 5.0e-4, "lr": None, "min_lr": 1.0e-6,
              "weight_decay": 0.05, "layer_decay": 0.65, "betas": [0.9, 0.999], "momentum": 0.9,
              "epochs": 100, "warmup_epochs": 5, "clip_grad": None},
    "train": {"mode": "finetune", "output_dir": "output/finetune", "micro_batch": 128,
              "precision": "auto", "device": "auto", "compile": False, "seed": 0, "resume": "auto",
              "stop_at_step": None},
    "eval": {"every_epochs": 1, "batch_size": 256},
    "checkpoint": {"every_epochs": 1, "keep": 1},
    "log": {"every_steps": 20, "tensorboard": False, "wandb": "none", "wandb_project": "rcmae"},
}


# MAE's linear-probing recipe for ViT-B (configs/linprobe/vit_base.yaml): what tools/linprobe.py runs
# without --config-file.
LINPROBE_DEFAULTS = {
    **DEFAULTS,
    "model": {**DEFAULTS["model"], "global_pool": "token", "drop_path": 0.0},
    "aug": {"rand_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0},
    "optim": {**DEFAULTS["optim"], "name": "lars", "batch_size": 16384, "base_lr": 0.1, "min_lr": 0.0,
              "weight_decay": 0.0, "epochs": 90, "warmup_epochs": 10},
    "train": {**DEFAULTS["train"], "mode": "linprobe", "output_dir": "output/linprobe", "micro_batch": 512},
    # a grid of probes from one backbone pass (finetune/probe_grid.py): base_lrs x features, each head chosen on
    # held_out_fraction of the training images; both lists empty: MAE's single probe
    "grid": {"base_lrs": [], "features": [], "held_out_fraction": 0.01},
}


KNN_TOOL_DEFAULTS = {
    "model": {"arch": "vit_base_patch16", "img_size": 224},
    "init": {"checkpoint": None, "which": "auto"},
    "data": {"source": "folder", "train_path": None, "val_path": None, "label_space": "folder",
             "num_workers": 10, "crop_pct": None},
    "knn": dict(KNN_DEFAULTS),
    "train": {"output_dir": "output/knn", "precision": "auto", "device": "auto"},
}
