"""Benchmark layouts (ImageNet val / -C / -A / -R / -Sketch), class-subset masks, the demo sets and
the ImageNet-C generator."""
from __future__ import annotations

import logging
import os
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import find_classes
from tqdm import tqdm

from finetune.data import DEMO_CLASSES, eval_dataset, imagenet_wnids, labelled_images
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD, SeededImages

from .metrics import BENCHMARK, EXTRA, SEVERITIES

log = logging.getLogger(__name__)

SUBSET_LISTS = {"imagenet_a": "imagenet_a_synsets.txt", "imagenet_r": "imagenet_r_synsets.txt"}
JPEG_QUALITY = 85


def class_mask(root: str | Path, benchmark: str) -> torch.Tensor:
    """Bool (1000,) mask of the ImageNet-1k classes whose wnid folders ``root`` holds, after checking
    them against the benchmark's canonical list (timm's ``imagenet_{a,r}_synsets.txt``)."""
    folders, _ = find_classes(str(root))
    allowed = set(imagenet_wnids(SUBSET_LISTS[benchmark]))
    stray = sorted(set(folders) - allowed)
    if stray:
        raise ValueError(f"{root}: folders {stray[:5]} are not {benchmark.replace('_', '-')} classes "
                         f"(timm's {SUBSET_LISTS[benchmark]}); is this the right dataset?")
    if len(folders) < len(allowed):
        log.warning("%s has %d of the %d %s classes: logits restricted to those present", root,
                    len(folders), len(allowed), benchmark)
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    mask = torch.zeros(len(index), dtype=torch.bool)
    mask[[index[w] for w in folders]] = True
    return mask


def imagenet_c_cells(root: str | Path) -> dict[str, dict[int, Path]]:
    """``<root>/<corruption>/<severity>/<wnid>/*`` -> {corruption: {severity: folder}}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C folder {root} does not exist")
    cells = {}
    for c in (*BENCHMARK, *EXTRA):
        for s in SEVERITIES:
            if (root / c / str(s)).is_dir():
                cells.setdefault(c, {})[s] = root / c / str(s)
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in (*BENCHMARK, *EXTRA))
    if unknown:
        log.warning("%s: ignoring folders that are not ImageNet-C corruptions: %s", root, unknown)
    if not cells:
        raise FileNotFoundError(f"{root} holds no <corruption>/<severity>/<wnid>/ folders")
    return cells


def imagenet_c_dataset(folder: Path, resize: bool, crop_pct: float = 0.875, img_size: int = 224):
    """ImageNet-C images are stored at 224 x 224 and evaluated as stored (the benchmark's protocol);
    ``resize`` applies the val pipeline (resize 256 + centre crop 224) instead."""
    if resize:
        return eval_dataset(folder, "imagenet1k", img_size, crop_pct, str(folder))[0]
    paths, labels, _ = labelled_images(folder, "imagenet1k", str(folder))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return SeededImages(paths, tf, labels, replace_unreadable=False)


# ----------------------------------------------------------------------------- generator
def _corrupt_one(task, out_root: Path):
    from imagecorruptions import corrupt

    src, rel, corruption, severity = task
    dst = out_root / corruption / str(severity) / rel
    if dst.exists():  # resumable: finished files are skipped
        return 0
    img = Image.open(src).convert("RGB")
    img = transforms.CenterCrop(224)(transforms.Resize(256)(img))  # as the benchmark was made
    arr = corrupt(np.asarray(img), corruption_name=corruption, severity=severity)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    Image.fromarray(np.uint8(arr)).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, dst)
    return 1


def make_imagenet_c(val: str | Path, out: str | Path, corruptions=(*BENCHMARK, *EXTRA),
                    severities=SEVERITIES, workers: int = 1, show_progress: bool = True) -> int:
    """Write ``out/<corruption>/<severity>/<wnid>/<name>.JPEG`` for every image of an ImageNet-style
    folder: resize 256, centre crop 224, corrupt (imagecorruptions), JPEG quality 85. Returns the
    number of files written (existing ones are kept)."""
    val, out = Path(val), Path(out)
    unknown = [c for c in corruptions if c not in (*BENCHMARK, *EXTRA)]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(BENCHMARK + EXTRA)}")
    if any(s not in SEVERITIES for s in severities):
        raise ValueError(f"severities must be in {SEVERITIES}, got {list(severities)}")
    paths, _, _ = labelled_images(val, "folder", "--val")
    tasks = [(p, Path(p).relative_to(val).with_suffix(".JPEG"), c, s)
             for c in corruptions for s in severities for p in paths]
    for stale in out.rglob("*.tmp") if out.exists() else []:
        stale.unlink()
    work = partial(_corrupt_one, out_root=out)
    bar = tqdm(total=len(tasks), desc="ImageNet-C", unit="img", disable=not show_progress)
    written = 0
    if workers > 1:
        with Pool(workers) as pool:
            for n in pool.imap_unordered(work, tasks, chunksize=8):
                written += n
                bar.update()
    else:
        for task in tasks:
            written += work(task)
            bar.update()
    bar.close()
    return written


# ----------------------------------------------------------------------------- demo
DEMO_A = {"chelsea": "n02123394", "clock": "n03196217"}  # Persian cat, digital clock: IN-A classes


def build_demo_benchmarks(root: str | Path, per_class: int = 3, workers: int = 1) -> dict[str, Path]:
    """Tiny ImageNet val / -C / -A / -R / -Sketch trees from scikit-image photos, folders named by
    real wnids (val, -R, -Sketch: tabby, espresso, missile, moped as available in each list; -A:
    Persian cat, digital clock), -C generated by :func:`make_imagenet_c` (all 19 corruptions,
    5 severities, from val)."""
    import skimage.data
    from skimage import color, feature

    root = Path(root)
    sets = {k: root / k for k in ("val", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")}
    if (root / ".complete").exists():
        return sets
    rng = np.random.default_rng(0)
    r_wnids = set(imagenet_wnids(SUBSET_LISTS["imagenet_r"]))

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
    make_imagenet_c(sets["val"], sets["imagenet_c"], workers=workers)
    (root / ".complete").touch()
    return sets
