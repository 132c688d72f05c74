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
    # pipeline: fast (default) | torchvision (the official transforms as they are); see pretrain/data.py
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

# tools/analyze_teacher.py (pretrain/analysis.py). Without --config-file: the comparison at ImageNet
# scale (RC-MAE ViT-B/16's recipe, 100 epochs, 3 seeds); data.train_path / data.val_path are required.
ANALYSIS_DEFAULTS = {
    "sections": ["linear", "compare", "probe"],
    # ImageFolder trees: pretraining, k-NN train and the probe's images (train); held-out
    # reconstruction and k-NN val (val). None: the pretraining config's own data (the demo's).
    "data": {"train_path": None, "val_path": None},
    "linear": {"seed": 0},
    "compare": {"pretrain_config": "pretrain/rcmae_vit_base",
                "pretrain_overrides": ["optim.epochs=100", "optim.warmup_epochs=10", "checkpoint.every_epochs=10",
                                       "checkpoint.keep=0", "knn.every_epochs=10"],
                "variants": ["mae", "rcmae_same", "rcmae_different"], "seeds": [0, 1, 2],
                "probe_every_steps": 500, "heldout_images": 256, "heldout_seed": 1234,
                "launcher": []},  # e.g. [torchrun, --nproc-per-node=8]; [] runs `python -m rcmae.tools.pretrain`
    "probe": {"checkpoint": None, "data_path": None, "batch_size": 32, "trials": 8, "crop_min_scale": 0.2,
              "lr": 1.0e-3, "momentum": 0.99, "seed": 0},
    "train": {"output_dir": "output/analyze_teacher", "device": "auto", "precision": "fp32"},
}
