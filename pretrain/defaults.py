"""Pretraining defaults: the RC-MAE ViT-B/16 recipe (what a run without --config-file trains)."""
from rcmae.core.defaults import KNN_DEFAULTS

# The RC-MAE ViT-B/16 recipe (configs/pretrain/rcmae_vit_base.yaml, which adds the official layout's
# micro-batch): what a run without --config-file trains.
DEFAULTS = {
    "model": {"arch": "vit_base_patch16", "img_size": 224, "decoder_dim": 512, "decoder_depth": 8,
              "decoder_heads": 16, "mask_ratio": 0.75, "norm_pix_loss": True},
    # momentum_schedule: cosine (ours, default) | official (the official code's lr and EMA timing, see rcmae.StepSchedules)
    "rcmae": {"gamma": 1.0, "momentum": 0.996, "teacher_mask": "same", "momentum_schedule": "cosine"},
    # source: folder (ImageFolder) | shards (tools/make_shards.py) | demo | synthetic
    # pipeline: fast (default) | torchvision (the official transforms as they are); see rcmae/core/data/pipelines.py
    "data": {"source": "folder", "path": None, "crop_min_scale": 0.2, "pipeline": "fast", "num_workers": 10,
             "synthetic_size": 4096},
    "optim": {"batch_size": 4096, "base_lr": 1.5e-4, "lr": None, "min_lr": 0.0,
              "weight_decay": 0.05, "betas": [0.9, 0.95], "clip_grad": None, "epochs": 1600,
              "warmup_epochs": 40, "decay_tokens": True},  # decay_tokens: official MAE / RC-MAE
    "train": {"output_dir": "output/pretrain", "micro_batch": 64, "precision": "auto",
              "device": "auto", "compile": False, "seed": 0, "resume": "auto", "init": None,
              "stop_at_step": None},
    "checkpoint": {"every_epochs": 1, "every_steps": 0, "keep": 2},
    "export": {"which": "teacher"},
    "analysis": {"every_steps": 0},  # the gradient probe (pretrain/probe.py): off by default, no cost
    "log": {"every_steps": 20, "tensorboard": False, "wandb": "none", "wandb_project": "rcmae",
            "recon_every_epochs": 1, "recon_images": 4},
    # k-NN monitor on a labelled folder pair (source demo: the labelled scikit-image set)
    "knn": {"every_epochs": 0, "source": "folder", "train_path": None, "val_path": None,
            "label_space": "folder", "crop_pct": None, **KNN_DEFAULTS},
}
