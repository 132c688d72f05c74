"""Defaults of the paper's analysis of the mean teacher (``tools/analyze_teacher.py``); light to import
(``--help`` reads them before torch loads)."""

# tools/analyze_teacher.py (analysis/mean_teacher.py). Without --config-file: the comparison at ImageNet
# scale (RC-MAE ViT-B/16's recipe, 100 epochs, 3 seeds); data.train_path / data.val_path are required.
DEFAULTS = {
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
