#!/usr/bin/env python
"""Fine-tune a pretrained ViT on ImageNet-1K with the MAE recipe (or linear-probe it: train.mode=linprobe).

  python tools/finetune.py                                      # the CPU demo (configs/finetune/demo.yaml)
  torchrun --nproc-per-node 8 tools/finetune.py --config-file configs/finetune/rcmae_vit_base.yaml \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
  python tools/finetune.py --config-file configs/finetune/rcmae_vit_base.yaml ... --slurm --nodes 4 --partition P
"""
import sys

from rcmae.core.errors import NonFiniteLossError
from rcmae.core.launcher import run_cli
from rcmae.finetune.defaults import DEFAULTS


def run(argv=None, defaults=DEFAULTS, name="rcmae-finetune", description=__doc__, demo="finetune/demo.yaml"):
    """Fine-tuning, or (with the linear-probe recipe: tools/linprobe.py) linear probing."""
    return run_cli(sys.argv[1:] if argv is None else argv, defaults=defaults, main="rcmae.finetune.train:main",
                   name=name, description=description, demo_config=demo, errors=(NonFiniteLossError,),
                   preflight="rcmae.finetune.train:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
