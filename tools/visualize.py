#!/usr/bin/env python
"""Pictures of a checkpoint on your images, one row per image (--kind, comma-separated):

  reconstruction  MAE's demo notebook: original | masked | student | teacher (teacher: RC-MAE checkpoints);
                  needs a pretraining checkpoint (ours, official MAE 'full', official RC-MAE)
  attention       DINO's: image | the last block's class-token attention, mean of the heads | head 1 .. H
  pca             DINOv2's: image | first principal component of the patch tokens (red: foreground) |
                  PCA of the foreground patches as RGB (one PCA over all the images, or --pca each)

attention and pca take any ViT rcmae.load_model reads (a pretraining checkpoint: its teacher, --which; an
encoder; a ViT classifier; a timm folder) or random:ARCH[@IMG] (a randomly initialised ViT, seeded --seed).
A folder of images gives its images in sorted order, one class subfolder after another (an ImageNet val
tree), --max-images of them from all folders together.

  python tools/visualize.py output/rcmae_vit_base/checkpoint_01600000.pth cat.jpg dog.jpg --out recon.png
  python tools/visualize.py mae_visualize_vit_large.pth photo.jpg --mask-ratio 0.75 --seed 2
  python tools/visualize.py output/demo_pretrain/checkpoint_00000640.pth output/demo_pretrain/demo_data \\
      --kind attention,pca --out pictures/teacher_{kind}.png
  python tools/visualize.py random:vit_mini_patch8@64 output/demo_pretrain/demo_data --kind attention,pca \\
      --out pictures/random_{kind}.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

KINDS = ("reconstruction", "attention", "pca")


def folder_images(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` images of ``folder``: its own and its subfolders' (classes), each in sorted order, one
    from each in turn; only the folders needed are listed (an ImageNet val tree: the first few classes)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)

    groups = [folder] + sorted(d for d in folder.iterdir() if d.is_dir())
    listed, picked, depth = {}, [], 0
    while len(picked) < limit:
        before = len(picked)
        for g in groups:
            if len(picked) == limit:
                break
            if g not in listed:
                listed[g] = images(g)
            if depth < len(listed[g]):
                picked.append(listed[g][depth])
        if len(picked) == before:
            break
        depth += 1
    return picked


def image_paths(sources: list[str], max_images: int) -> list[Path]:
    """The files as given, and up to ``max_images`` images from the folders (:func:`folder_images`)."""
    paths, budget = [], max_images
    for source in map(Path, sources):
        if source.is_dir():
            found = folder_images(source, budget)
            if not found and budget:
                raise FileNotFoundError(f"image folder {source} holds no images")
            paths, budget = paths + found, budget - len(found)
        elif source.is_file():
            paths.append(source)
        else:
            raise FileNotFoundError(f"image {source} does not exist")
    return paths


def run(argv=None):
    p = argparse.ArgumentParser(prog="rcmae-visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a pretraining checkpoint; for attention / pca also an encoder, a ViT "
                                      "classifier, a timm folder or random:ARCH[@IMG]")
    p.add_argument("images", nargs="+", help="image files (any size: resized and centre-cropped) or folders")
    p.add_argument("--kind", default="reconstruction",
                   help=f"comma-separated, of {', '.join(KINDS)} (default: %(default)s)")
    p.add_argument("--out", default="{kind}.png", help="the figure to write; {kind} is replaced by the kind, "
                                                       "required with several kinds (default: %(default)s)")
    p.add_argument("--which", choices=("auto", "teacher", "student"), default="auto",
                   help="the encoder of a pretraining checkpoint for attention / pca (auto: the teacher if any)")
    p.add_argument("--max-images", type=int, default=4,
                   help="images taken from folders, all together (default: %(default)s)")
    p.add_argument("--pca", choices=("joint", "each"), default="joint",
                   help="one PCA over all the images (DINOv2's figures: images of one category), or one per image "
                        "(images of different classes) (default: %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's (0.75)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random masks and of a random: backbone (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="check the checkpoint and the images, write nothing")
    args = p.parse_args(argv)
    kinds = list(dict.fromkeys(k.strip() for k in args.kind.split(",") if k.strip()))
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kind must be a comma-separated list of {', '.join(KINDS)}, got {args.kind!r}")
    if len(kinds) > 1 and "{kind}" not in args.out:
        p.error(f"--out {args.out} must contain {{kind}} when several kinds are drawn (e.g. --out {{kind}}.png)")
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.max_images < 1:
        p.error(f"--max-images must be at least 1, got {args.max_images}")

    import torch  # after parsing: --help stays instant
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms

    import rcmae
    from rcmae.analysis.features import feature_vit, random_vit, save_attention, save_pca
    from rcmae.benchmark.plan import read_backbone
    from rcmae.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from rcmae.core.errors import CheckpointError, ConfigError
    from rcmae.pretrain.rcmae import RCMAE
    from rcmae.pretrain.visualize import save_reconstruction

    try:  # every check before the first byte is written
        if args.checkpoint.startswith("random:"):
            backbone = read_backbone(args.checkpoint)
            model = random_vit(backbone.arch, backbone.img_size, args.seed)
        else:
            model = rcmae.load_model(args.checkpoint, which=args.which)
        if "reconstruction" in kinds and not isinstance(model, RCMAE):
            raise CheckpointError(f"{args.checkpoint} holds no decoder (an encoder or a classifier): reconstructions "
                                  "need a pretraining checkpoint")
        vit = feature_vit(model, args.which) if set(kinds) - {"reconstruction"} else None
        if "attention" in kinds and vit.cls_token is None:
            raise CheckpointError(f"{args.checkpoint}: a ViT without class token has no class-token attention")
        photos = []
        for path in image_paths(args.images, args.max_images):
            try:
                photos.append(Image.open(path).convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                sys.exit(f"error: cannot read image {path}: {e}")
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        print(f"dry run: {args.checkpoint} and {len(photos)} image(s) read; would write "
              f"{', '.join(args.out.replace('{kind}', k) for k in kinds)}")
        return None

    def inputs(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
        """The images normalised for the model, and in [0, 1] for display."""
        tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(size), transforms.ToTensor()])
        pictures = torch.stack([tf(photo) for photo in photos])
        return (pictures - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1), pictures

    parts = Path(args.checkpoint).parts  # a figure's title: a long path by its last three parts
    label = args.checkpoint if len(args.checkpoint) <= 60 or len(parts) <= 3 else ".../" + "/".join(parts[-3:])
    written = []
    for kind in kinds:
        out = Path(args.out.replace("{kind}", kind))
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "reconstruction":
            if args.mask_ratio is not None:
                model.mask_ratio = args.mask_ratio
            batch, _ = inputs(model.student.patch_embed.img_size[0])
            noise = torch.rand(batch.shape[0], model.student.num_patches,
                               generator=torch.Generator().manual_seed(args.seed))
            written.append(save_reconstruction(model, batch, noise, out,
                                               f"{label} (mask {model.mask_ratio:.0%})"))
        else:
            cfg = getattr(vit, "pretrained_cfg", None) or {}  # a timm folder declares its preprocessing
            batch, pictures = inputs(vit.patch_embed.img_size[0], cfg.get("mean", IMAGENET_MEAN),
                                     cfg.get("std", IMAGENET_STD))
            title = label
            if isinstance(model, RCMAE):
                title += f" ({'student' if model.teacher is None or args.which == 'student' else 'teacher'})"
            if kind == "attention":
                written.append(save_attention(vit, batch, pictures, out, title))
            else:
                written.append(save_pca(vit, batch, pictures, out, f"{title}, PCA {args.pca}", args.pca == "joint"))
        print(written[-1])
    return written[0] if len(written) == 1 else written


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
