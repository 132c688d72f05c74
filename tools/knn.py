#!/usr/bin/env python
"""Weighted k-NN accuracy (k=20, T=0.07, cosine) of a backbone on a labelled train / val folder pair.

  python tools/knn.py                                            # the CPU demo (configs/knn/demo.yaml)
  torchrun --nproc-per-node 8 tools/knn.py \\
      init.checkpoint=output/rcmae_vit_base/checkpoint_01600000.pth \\
      data.train_path=/imagenet/train data.val_path=/imagenet/val
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from finetune.knn_tool import DEFAULTS, main, validate  # noqa: E402
from pretrain.launcher import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(sys.argv[1:], defaults=DEFAULTS, main=main, name="vit-knn", description=__doc__,
            demo_config=ROOT / "configs" / "knn" / "demo.yaml", preflight=validate)
