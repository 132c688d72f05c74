#!/usr/bin/env python
"""RC-MAE / MAE pretraining.

  python tools/pretrain.py                                   # the CPU demo (configs/pretrain/demo.yaml)
  python tools/pretrain.py data.path=/imagenet/train         # the default recipe: RC-MAE ViT-B/16
  python tools/pretrain.py --config-file configs/pretrain/rcmae_vit_large.yaml data.path=/imagenet/train
  torchrun --nproc-per-node 8 tools/pretrain.py --config-file ... train.micro_batch=128
  python tools/pretrain.py --config-file ... --slurm --nodes 4 --gpus-per-node 8 --partition P --timeout 4320
"""
import sys

from rcmae.core.errors import NonFiniteLossError
from rcmae.core.launcher import run_cli
from rcmae.pretrain.defaults import DEFAULTS


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv, defaults=DEFAULTS, main="rcmae.pretrain.train:main",
                   name="rcmae-pretrain", description=__doc__, demo_config="pretrain/demo.yaml", errors=(NonFiniteLossError,),
                   preflight="rcmae.pretrain.train:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
