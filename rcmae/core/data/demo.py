"""The demo data: ImageFolder trees of crops of the real photos that ship with scikit-image
(unlabelled for pretraining, labelled by ImageNet wnid for the downstream demos)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rcmae.core.data.wnids import imagenet_wnids

# Real RGB photos shipped inside scikit-image (no download needed).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
               "hubble_deep_field", "immunohistochemistry", "retina")


def build_demo_folder(root: str | Path, crops_per_photo: int = 32, size: int = 96,
                      seed: int = 0) -> Path:
    """ImageFolder tree of JPEG crops of the photos that ship with scikit-image.

    Deterministic; reused when already complete. Returns the tree's root.
    """
    import skimage.data

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for name in DEMO_PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo
        h, w = photo.shape[:2]
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        for k in range(crops_per_photo):
            side = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size),
                                                                         Image.BICUBIC)
            crop.save(out / f"{name}_{k:03d}.jpg", quality=90)
    done.touch()
    return root


# Real photos shipped with scikit-image, named by the ImageNet-1k class they show.
DEMO_CLASSES = {"chelsea": "n02123045",            # tabby, tabby cat
                "coffee": "n07920052",             # espresso
                "rocket": "n03773504",             # missile
                "stereo_motorcycle": "n03785016"}  # moped


def build_demo_labelled(root: str | Path, train_per_class: int = 24, val_per_class: int = 8,
                        size: int = 96, seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.jpg``: disjoint random crops of the scikit-image photos."""
    import skimage.data

    root = Path(root)
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    for name, wnid in DEMO_CLASSES.items():
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo
        h, w = photo.shape[:2]
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            out = root / split / wnid
            out.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                side = int(min(h, w) * rng.uniform(0.4, 0.9))
                y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                crop.save(out / f"{name}_{k:03d}.jpg", quality=90)
    (root / ".complete").touch()
    return root


DEMO_A = {"chelsea": "n02123394", "clock": "n03196217"}  # Persian cat, digital clock: IN-A classes


def build_demo_benchmarks(root: str | Path, make_imagenet_c, per_class: int = 3) -> dict[str, Path]:
    """Tiny ImageNet val / -C / -A / -R / -Sketch trees from scikit-image photos, folders named by
    real wnids (val, -R, -Sketch: tabby, espresso, missile, moped as available in each list; -A:
    Persian cat, digital clock), -C generated from val by ``make_imagenet_c(val, out)`` (the
    robustness job's generator: :func:`rcmae.robustness.imagenet_c.make_imagenet_c`)."""
    import skimage.data
    from skimage import color, feature

    root = Path(root)
    sets = {k: root / k for k in ("val", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")}
    if (root / ".complete").exists():
        return sets
    rng = np.random.default_rng(0)
    r_wnids = set(imagenet_wnids("imagenet_r_synsets.txt"))

    def crops(name, n):
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo
        h, w = photo.shape[:2]
        for _ in range(n):
            side = int(min(h, w) * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            yield Image.fromarray(photo[y:y + side, x:x + side]).resize((256, 256), Image.BICUBIC)

    for name, wnid in DEMO_CLASSES.items():
        for k, img in enumerate(crops(name, 3 * per_class)):
            split = ("val", "imagenet_r", "imagenet_sketch")[k % 3]
            if split == "imagenet_r" and wnid not in r_wnids:
                continue
            if split == "imagenet_sketch":  # a pencil-sketch rendering: inverted edges on white
                edges = feature.canny(color.rgb2gray(np.asarray(img)), sigma=2)
                img = Image.fromarray(np.uint8(255 * (1 - edges))).convert("RGB")
            (sets[split] / wnid).mkdir(parents=True, exist_ok=True)
            img.save(sets[split] / wnid / f"{name}_{k:03d}.JPEG", quality=90)
    for name, wnid in DEMO_A.items():
        (sets["imagenet_a"] / wnid).mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(crops(name, per_class)):
            img.save(sets["imagenet_a"] / wnid / f"{name}_{k:03d}.JPEG", quality=90)
    make_imagenet_c(sets["val"], sets["imagenet_c"])
    (root / ".complete").touch()
    return sets
