#!/usr/bin/env python
"""What a backbone costs: parameters, FLOPs per image, inference throughput and peak memory, in <output>/cost.json.

  python tools/measure_cost.py                                    # the CPU demo: a random vit_mini_patch8, 64 px
  python tools/measure_cost.py --checkpoint output/rcmae_vit_base/checkpoint_01600000.pth --output out/cost
  python tools/measure_cost.py --checkpoint mae_pretrain_vit_base.pth --batch-size 256 train.precision=fp16
  python tools/measure_cost.py --arch vit_large_patch16 --output out/cost_vit_l   # a random ViT-L/16, 224 px

The encoder is measured as used downstream (no head, eval mode, no gradients). Its architecture and input size
come from the checkpoint (ours, official MAE / RC-MAE, an exported encoder, a timm ViT state dict). FLOPs are
fvcore's for one image (one multiply-add = one flop); throughput and memory are measured on this process's GPU
(else the CPU) in train.precision. Under torchrun only the first process measures.
"""
import sys

from rcmae.benchmark.cost import DEFAULTS
from rcmae.core.launcher import run_cli

FLAGS = {"checkpoint": "model.checkpoint", "arch": "model.arch", "img_size": "model.img_size",
         "batch_size": "cost.batch_size", "iters": "cost.iters", "output": "train.output_dir"}


def add_args(p):
    p.add_argument("--checkpoint", help="ours (pretraining or an exported encoder), an official MAE / RC-MAE file "
                   "or a timm ViT state dict; without one, a random --arch")
    p.add_argument("--arch", help="our ViT name (vit_base_patch16, ...); read from the checkpoint otherwise")
    p.add_argument("--img-size", type=int, help="input size; default: the checkpoint's (else 224)")
    p.add_argument("--batch-size", type=int, help="images per timed forward")
    p.add_argument("--iters", type=int, help="timed forwards (after cost.warmup_iters untimed ones)")
    p.add_argument("--output", metavar="DIR")


def to_overrides(args):
    return [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]


def run(argv=None):
    return run_cli(sys.argv[1:] if argv is None else argv,
                   defaults=DEFAULTS, main="rcmae.benchmark.cost:main", name="rcmae-measure-cost",
                   description=__doc__, demo_config="cost/demo.yaml", add_args=add_args,
                   args_to_overrides=to_overrides, preflight="rcmae.benchmark.cost:validate")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
