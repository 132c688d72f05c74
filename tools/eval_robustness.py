#!/usr/bin/env python
"""ImageNet-C (mCE), ImageNet-A, ImageNet-R, ImageNet-Sketch (and clean val) for one classifier.

  python tools/eval_robustness.py                                # CPU demo on tiny trees of real photos
  python tools/eval_robustness.py --checkpoint output/finetune_rcmae_vit_base/classifier_best.pth \\
      --imagenet-val /data/imagenet/val --imagenet-c /data/imagenet-c --imagenet-a /data/imagenet-a \\
      --imagenet-r /data/imagenet-r --imagenet-sketch /data/imagenet-sketch/sketch --output out/robust
  torchrun --nproc-per-node 8 tools/eval_robustness.py --checkpoint mae_finetuned_vit_base.pth ...
  python tools/eval_robustness.py --checkpoint resnet18.pth --model resnet18 ...   # any timm classifier

The architecture and input size come from the checkpoint (ours, MAE fine-tuned); a timm state dict
needs --model with its timm name. Preprocessing follows the weights (MAE's evaluation for our ViTs,
timm's data config for timm models; --preprocessing overrides it) and is stated in every output.
A rerun with the same --output skips what results.jsonl already holds (--no-resume: evaluate anew).
"""
import argparse
import sys

from rcmae.core.launcher import run_cli
from rcmae.robustness.defaults import DATASETS, DEFAULTS

FLAGS = {"checkpoint": "model.checkpoint", "model": "model.arch", "img_size": "model.img_size",
         "preprocessing": "model.preprocessing", "output": "train.output_dir", "batch_size": "data.batch_size",
         "workers": "data.num_workers", "imagenet_c_resize": "data.imagenet_c_resize",
         **{name: f"data.{name}" for name in DATASETS}}


def add_args(p):
    p.add_argument("--checkpoint", help="our classifier, an official MAE fine-tuned file or a timm state dict")
    p.add_argument("--model", help="timm model name of a timm state dict (resnet18, convnext_tiny, "
                   "vit_base_patch16_224, ...); read from the checkpoint otherwise. Without --checkpoint: "
                   "timm's pretrained weights of that name")
    p.add_argument("--img-size", type=int, help="input size when the checkpoint does not tell it")
    p.add_argument("--preprocessing", choices=("auto", "mae", "timm"),
                   help="auto (default): MAE's evaluation for our ViTs, timm's data config for timm models")
    for name in DATASETS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="DIR")
    p.add_argument("--imagenet-c-resize", action=argparse.BooleanOptionalAction, default=None,
                   help="give ImageNet-C the val preprocessing (resize + centre crop); default: "
                        "evaluated as stored, 224 x 224, as the benchmark defines")
    p.add_argument("--output", metavar="DIR")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)


def to_overrides(args):
    def text(value):
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [f"{key}={text(getattr(args, flag))}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv,
                   defaults=DEFAULTS, main="rcmae.robustness.evaluate:main", name="rcmae-eval-robustness",
                   description=__doc__, demo_config="robustness/demo.yaml", errors=(ValueError,),
                   add_args=add_args, args_to_overrides=to_overrides, preflight="rcmae.robustness.evaluate:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
