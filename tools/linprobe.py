#!/usr/bin/env python
"""Linear probing of a frozen pretrained ViT on ImageNet-1K (MAE recipe: BatchNorm + linear head, LARS).

  python tools/linprobe.py                                      # the CPU demo (configs/linprobe/demo.yaml)
  torchrun --nproc-per-node 8 tools/linprobe.py --config-file configs/linprobe/vit_base.yaml \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
  python tools/linprobe.py --config-file configs/linprobe/vit_base.yaml ... --slurm --nodes 4 --partition P
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from finetune.train import LINPROBE_DEFAULTS, main, validate  # noqa: E402
from pretrain.launcher import run_cli  # noqa: E402
from pretrain.run import NonFiniteLossError  # noqa: E402

if __name__ == "__main__":
    run_cli(sys.argv[1:], defaults=LINPROBE_DEFAULTS, main=main, name="vit-linprobe", description=__doc__,
            demo_config=ROOT / "configs" / "linprobe" / "demo.yaml", errors=(NonFiniteLossError,),
            preflight=validate)
