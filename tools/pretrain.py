#!/usr/bin/env python
"""RC-MAE / MAE pretraining.

  python tools/pretrain.py                                   # the CPU demo (configs/pretrain/demo.yaml)
  python tools/pretrain.py data.path=/imagenet/train         # the default recipe: RC-MAE ViT-B/16
  python tools/pretrain.py --config-file configs/pretrain/rcmae_vit_large.yaml data.path=/imagenet/train
  torchrun --nproc-per-node 8 tools/pretrain.py --config-file ... train.micro_batch=128
  python tools/pretrain.py --config-file ... --slurm --nodes 4 --gpus-per-node 8 --partition P --timeout 4320
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from pretrain.launcher import run_cli  # noqa: E402
from pretrain.run import NonFiniteLossError  # noqa: E402
from pretrain.train import DEFAULTS, main, validate  # noqa: E402

if __name__ == "__main__":
    run_cli(sys.argv[1:], defaults=DEFAULTS, main=main, name="rcmae-pretrain", description=__doc__,
            demo_config=ROOT / "configs" / "pretrain" / "demo.yaml", errors=(NonFiniteLossError,),
            preflight=validate)
