#!/usr/bin/env python
"""Reconstructions of a pretraining checkpoint on your images, as MAE's demo notebook shows them:
one row per image, original | masked | student | teacher (teacher: RC-MAE checkpoints).

  python tools/visualize.py output/rcmae_vit_base/checkpoint_01600000.pth cat.jpg dog.jpg --out recon.png
  python tools/visualize.py mae_visualize_vit_large.pth photo.jpg --mask-ratio 0.75 --seed 2
"""
from __future__ import annotations

import argparse
import sys


def run(argv=None):
    p = argparse.ArgumentParser(prog="rcmae-visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretraining checkpoint (ours, official MAE 'full', official RC-MAE)")
    p.add_argument("images", nargs="+", help="image files (any size: resized and centre-cropped)")
    p.add_argument("--out", default="reconstruction.png", help="the figure to write (default: %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's (0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default: %(default)s)")
    args = p.parse_args(argv)
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")

    import torch  # after parsing: --help stays instant
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms

    import rcmae
    from rcmae.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from rcmae.core.errors import CheckpointError
    from rcmae.pretrain.rcmae import RCMAE
    from rcmae.pretrain.visualize import save_reconstruction

    try:
        model = rcmae.load_model(args.checkpoint)
        if not isinstance(model, RCMAE):
            raise CheckpointError(f"{args.checkpoint} holds no decoder (an encoder or a classifier): reconstructions "
                                  "need a pretraining checkpoint")
        if args.mask_ratio is not None:
            model.mask_ratio = args.mask_ratio
        size = model.student.patch_embed.img_size[0]
        tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(size), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        imgs = []
        for path in args.images:
            try:
                imgs.append(tf(Image.open(path).convert("RGB")))
            except (OSError, UnidentifiedImageError) as e:
                sys.exit(f"error: cannot read image {path}: {e}")
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    batch = torch.stack(imgs)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(batch.shape[0], model.student.num_patches, generator=g)
    out = save_reconstruction(model, batch, noise, args.out, f"{args.checkpoint} (mask {model.mask_ratio:.0%})")
    print(out)
    return out


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
