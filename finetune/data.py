"""Labelled image folders, ImageNet class indices, the embedded labelled demo set, transforms."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import timm.data
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from rcmae.pretrain.data import (IMAGENET_MEAN, IMAGENET_STD, SeededImages, check_folder_pair, image_folder_classes,
                           image_folder_samples, mae_eval_config)

# Real photos shipped with scikit-image, named by the ImageNet-1k class they show.
DEMO_CLASSES = {"chelsea": "n02123045",            # tabby, tabby cat
                "coffee": "n07920052",             # espresso
                "rocket": "n03773504",             # missile
                "stereo_motorcycle": "n03785016"}  # moped


@lru_cache(maxsize=None)
def imagenet_wnids(name: str = "imagenet_synsets.txt") -> tuple[str, ...]:
    """The canonical ImageNet wnid lists shipped with timm (1k order; A and R subsets)."""
    path = Path(timm.data.__file__).parent / "_info" / name
    return tuple(path.read_text().split())


def labelled_images(root: str | Path, label_space: str, what: str) -> tuple[list[str], list[int], int]:
    """``root/<class>/<image>`` -> paths, labels, number of classes.

    ``label_space``: ``folder`` (sorted folder index) or ``imagenet1k`` (folders are wnids, labels
    are their index among the 1000 ImageNet-1k classes, whatever subset of folders is present).
    """
    classes = image_folder_classes(root, what)
    if label_space == "folder":
        class_to_idx, num_classes = {c: i for i, c in enumerate(classes)}, len(classes)
    elif label_space == "imagenet1k":
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"{what}: folders {unknown[:5]} of {root} are not ImageNet-1k wnids "
                             "(use data.label_space=folder)")
        class_to_idx, num_classes = {c: index[c] for c in classes}, len(index)
    else:
        raise ValueError(f"data.label_space must be folder or imagenet1k, got {label_space!r}")
    samples = image_folder_samples(root, class_to_idx, what)
    return [p for p, _ in samples], [y for _, y in samples], num_classes


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


def labelled_pair(d: dict, out_dir: Path, is_main: bool, section: str = "data",
                  demo_dir: str = "demo_data") -> tuple:
    """(train_path, val_path, label_space) of a config section with ``source`` (folder / demo),
    ``train_path``, ``val_path``, ``label_space``; the demo set is built (by the main process) under
    ``out_dir / demo_dir``."""
    from rcmae.pretrain.distributed import barrier

    check_folder_pair(d, section)
    if d["source"] == "demo":
        root = Path(out_dir) / demo_dir
        if is_main:
            build_demo_labelled(root)
        barrier()
        return root / "train", root / "val", "imagenet1k"
    return d["train_path"], d["val_path"], d["label_space"]


def labelled_eval_sets(d: dict, out_dir: Path, is_main: bool, img_size: int, section: str = "data",
                       demo_dir: str = "demo_data"):
    """Train and val sets of :func:`labelled_pair`, both with the evaluation transform (k-NN
    features); returns (train, val, number of classes)."""
    train_path, val_path, label_space = labelled_pair(d, out_dir, is_main, section, demo_dir)
    (train, num_classes), (val, _) = [eval_dataset(p, label_space, img_size, d["crop_pct"], f"{section}.{what}")
                                      for p, what in ((train_path, "train_path"), (val_path, "val_path"))]
    return train, val, num_classes


def train_transform(img_size: int, aug: dict, mode: str):
    """Fine-tuning: timm's RandAugment / random-erasing pipeline; linear probing: crop + flip only."""
    if mode == "linprobe":
        return transforms.Compose([
            transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return create_transform(img_size, is_training=True, auto_augment=aug["rand_augment"] or None,
                            color_jitter=None, interpolation="bicubic", re_prob=aug["reprob"],
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(img_size: int, crop_pct: float | None):
    """Resize the short side to ``img_size / crop_pct`` (256 for 224) bicubic, centre crop;
    ``crop_pct`` None follows MAE (:func:`pretrain.data.eval_crop_pct`)."""
    return create_transform(**mae_eval_config(img_size, crop_pct), is_training=False)


def labelled_dataset(root: str | Path, label_space: str, transform, what: str) -> tuple[SeededImages, int]:
    """An evaluation set of a labelled folder (unreadable images counted apart, never replaced);
    returns it with the number of classes of ``label_space``."""
    paths, labels, num_classes = labelled_images(root, label_space, what)
    return SeededImages(paths, transform, labels, replace_unreadable=False), num_classes


def eval_dataset(root: str | Path, label_space: str, img_size: int, crop_pct: float | None, what: str):
    return labelled_dataset(root, label_space, eval_transform(img_size, crop_pct), what)
