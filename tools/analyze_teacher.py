#!/usr/bin/env python
"""What the mean teacher does to the gradient, measured (the seed paper's analysis; analysis/mean_teacher.py).

  python tools/analyze_teacher.py        # the CPU demo: linear model, MAE vs RC-MAE over 3 seeds, probe (minutes)
  python tools/analyze_teacher.py data.train_path=/imagenet/train data.val_path=/imagenet/val   # ViT-B, 100 ep
  python tools/analyze_teacher.py --config-file configs/analysis/imagenet_vit_base.yaml data.train_path=... \\
      compare.launcher=[torchrun,--nproc-per-node=8]
  python tools/analyze_teacher.py sections=[probe] probe.checkpoint=CKPT probe.data_path=/imagenet/train

Writes analysis.json (every number), CSVs and PNG figures to train.output_dir.
"""
import sys

from rcmae.analysis.defaults import DEFAULTS as ANALYSIS_DEFAULTS
from rcmae.core.launcher import run_cli


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv, defaults=ANALYSIS_DEFAULTS,
                   main="rcmae.analysis.mean_teacher:main", name="rcmae-analyze-teacher", description=__doc__,
                   demo_config="analysis/demo.yaml", preflight="rcmae.analysis.mean_teacher:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
