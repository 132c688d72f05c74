#!/usr/bin/env python
"""ImageNet-C (mCE), ImageNet-A, ImageNet-R, ImageNet-Sketch (and clean val) for one classifier.

  python tools/eval_robustness.py                                # CPU demo on tiny trees of real photos
  python tools/eval_robustness.py --checkpoint output/finetune_vit_base_patch16/classifier_best.pth \\
      --imagenet-val /data/imagenet/val --imagenet-c /data/imagenet-c --imagenet-a /data/imagenet-a \\
      --imagenet-r /data/imagenet-r --imagenet-sketch /data/imagenet-sketch/sketch --output out/robust
  torchrun --nproc-per-node 8 tools/eval_robustness.py --checkpoint mae_finetuned_vit_base.pth ...
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from pretrain.launcher import run_cli  # noqa: E402
from robustness.evaluate import DATASETS, DEFAULTS, main  # noqa: E402

FLAGS = {"checkpoint": "model.checkpoint", "model": "model.arch", "output": "train.output_dir",
         "batch_size": "data.batch_size", "workers": "data.num_workers",
         **{name: f"data.{name}" for name in DATASETS}}


def add_args(p):
    p.add_argument("--checkpoint", help="our classifier, an official MAE fine-tuned file or a timm checkpoint")
    p.add_argument("--model", help="architecture when the checkpoint does not name it (default "
                   "vit_base_patch16; a timm model name works too, without --checkpoint: timm's weights)")
    for name in DATASETS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="DIR")
    p.add_argument("--imagenet-c-resize", action="store_true",
                   help="resize 256 + crop 224 the ImageNet-C images too (default: as stored, 224 px)")
    p.add_argument("--output", metavar="DIR")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)


def to_overrides(args):
    out = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    return out + (["data.imagenet_c_resize=true"] if args.imagenet_c_resize else [])


if __name__ == "__main__":
    run_cli(sys.argv[1:], defaults=DEFAULTS, main=main, name="robustness", description=__doc__,
            demo_config=ROOT / "configs" / "robustness" / "demo.yaml", errors=(ValueError,),
            add_args=add_args, args_to_overrides=to_overrides)
