#!/usr/bin/env python
"""Linear probing of a frozen pretrained ViT on ImageNet-1K (MAE recipe: BatchNorm + linear head, LARS).

  python tools/linprobe.py                                      # the CPU demo (configs/linprobe/demo.yaml)
  torchrun --nproc-per-node 8 tools/linprobe.py --config-file configs/linprobe/vit_base.yaml \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
  python tools/linprobe.py --config-file configs/linprobe/vit_base.yaml ... --slurm --nodes 4 --partition P
"""
from rcmae.finetune.defaults import LINPROBE_DEFAULTS
from rcmae.tools import finetune


def run(argv=None):
    return finetune.run(argv, defaults=LINPROBE_DEFAULTS, name="rcmae-linprobe", description=__doc__,
                        demo="linprobe/demo.yaml")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
