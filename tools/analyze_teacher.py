#!/usr/bin/env python
"""What the mean teacher does to the gradient, measured (the seed paper's analysis; pretrain/analysis.py).

  python tools/analyze_teacher.py        # the CPU demo: linear model, MAE vs RC-MAE over 3 seeds, probe (minutes)
  python tools/analyze_teacher.py data.train_path=/imagenet/train data.val_path=/imagenet/val   # ViT-B, 100 ep
  python tools/analyze_teacher.py --config-file configs/analysis/imagenet_vit_base.yaml data.train_path=... \\
      compare.launcher=[torchrun,--nproc-per-node=8]
  python tools/analyze_teacher.py sections=[probe] probe.checkpoint=CKPT probe.data_path=/imagenet/train

Writes analysis.json (every number), CSVs and PNG figures to train.output_dir.
"""
import sys

from rcmae.core.launcher import run_cli
from rcmae.pretrain.defaults import ANALYSIS_DEFAULTS


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv, defaults=ANALYSIS_DEFAULTS,
                   main="rcmae.pretrain.analysis:main", name="rcmae-analyze-teacher", description=__doc__,
                   demo_config="analysis/demo.yaml", preflight="rcmae.pretrain.analysis:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
