#!/usr/bin/env python
"""RC-MAE / MAE pretraining.

  python tools/pretrain.py                                   # the CPU demo (configs/pretrain/demo.yaml)
  python tools/pretrain.py data.path=/imagenet/train         # the default recipe: RC-MAE ViT-B/16
  python tools/pretrain.py --config-file configs/pretrain/rcmae_vit_large.yaml data.path=/imagenet/train
  torchrun --nproc-per-node 8 tools/pretrain.py --config-file ... train.micro_batch=128
  python tools/pretrain.py --config-file ... --slurm --nodes 4 --gpus-per-node 8 --partition P --timeout 4320
"""
import sys

from rcmae.core.config import config_path
from rcmae.core.launcher import run_cli
from rcmae.core.run import NonFiniteLossError
from rcmae.pretrain.train import DEFAULTS, validate
from rcmae.pretrain.train import main as train


def main(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv,
                   defaults=DEFAULTS, main=train, name="rcmae-pretrain", description=__doc__,
                   demo_config=config_path("pretrain/demo.yaml"), errors=(NonFiniteLossError,), preflight=validate)


if __name__ == "__main__":
    main()
