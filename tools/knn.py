#!/usr/bin/env python
"""Weighted k-NN accuracy (k=20, T=0.07, cosine) of a backbone on a labelled train / val folder pair.

  python tools/knn.py                                            # the CPU demo (configs/knn/demo.yaml)
  torchrun --nproc-per-node 8 tools/knn.py \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
"""
import sys

from rcmae.core.launcher import run_cli
from rcmae.finetune.defaults import KNN_TOOL_DEFAULTS


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv, defaults=KNN_TOOL_DEFAULTS, main="rcmae.finetune.knn_tool:main",
                   name="rcmae-knn", description=__doc__, demo_config="knn/demo.yaml",
                   preflight="rcmae.finetune.knn_tool:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
