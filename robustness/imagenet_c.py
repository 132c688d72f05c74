"""The ImageNet-C generator: ``<out>/<corruption>/<severity>/<wnid>/<name>.JPEG`` from an ImageNet-style
folder, made as the benchmark was (resize 256, centre crop 224, corrupt, JPEG quality 85)."""
from __future__ import annotations

import os
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from finetune.data import labelled_images

from .metrics import BENCHMARK, EXTRA, SEVERITIES

JPEG_QUALITY = 85


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
