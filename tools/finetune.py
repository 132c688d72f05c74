#!/usr/bin/env python
"""Fine-tune a pretrained ViT on ImageNet-1K with the MAE recipe (or linear-probe it: train.mode=linprobe).

  python tools/finetune.py                                      # the CPU demo (configs/finetune/demo.yaml)
  torchrun --nproc-per-node 8 tools/finetune.py --config-file configs/finetune/rcmae_vit_base.yaml \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
  python tools/finetune.py --config-file configs/finetune/rcmae_vit_base.yaml ... --slurm --nodes 4 --partition P
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from finetune.train import DEFAULTS, main, validate  # noqa: E402
from pretrain.launcher import run_cli  # noqa: E402
from pretrain.run import NonFiniteLossError  # noqa: E402

if __name__ == "__main__":
    run_cli(sys.argv[1:], defaults=DEFAULTS, main=main, name="vit-finetune", description=__doc__,
            demo_config=ROOT / "configs" / "finetune" / "demo.yaml", errors=(NonFiniteLossError,),
            preflight=validate)
