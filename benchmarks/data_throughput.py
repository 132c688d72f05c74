#!/usr/bin/env python
"""Images per second of the pretraining input pipelines, against the official MAE code's torchvision one.

  python benchmarks/data_throughput.py                        # generates an ImageNet-like folder, all cores
  python benchmarks/data_throughput.py --data /imagenet/train --workers 16 --images 20000 --json out.json

Baseline (exactly the official ``main_pretrain.py``): ``torchvision.datasets.ImageFolder`` +
RandomResizedCrop(224, scale (0.2, 1), bicubic) + RandomHorizontalFlip + ToTensor + Normalize. Ours: the
``fast`` pipeline of ``rcmae/core/data/transforms.py`` (``data.pipeline``), and the ``gpu`` one where CUDA is present
(loader workers read bytes and draw crops, nvJPEG decodes in the main process: its "per core" figure is
what one worker feeds, its total what the GPU sustains). Each runs through a DataLoader (batch 64,
shuffled) with a single worker process (images/s per core: the worker decodes, the main process only
collates) and with ``--workers`` processes (total), on the same images, in ``--rounds`` alternating
rounds (torchvision, fast, torchvision, fast, ...; ``--images`` split between them): the figures are the
medians of the rounds, the speed-ups the medians of the ratios of paired rounds, so a shared machine
busy during a few rounds does not skew them. Images are counted as the first dimension of each batch's
image tensor. A quality check decodes the same seeded samples with both and reports PSNR and the largest
difference (0-255) on identical crop boxes. The last line reads ``per-core speedup vs torchvision: X.XX``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.folder import list_images
from rcmae.core.data.gpu import collate_encoded, decode_on_device
from rcmae.core.data.pipelines import pretrain_transform
from rcmae.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZE, MIN_SCALE, BATCH = 224, 0.2, 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an ImageFolder tree of JPEGs (default: generate one)")
    p.add_argument("--generated", default="output/bench_jpegs", help="where to generate it")
    p.add_argument("--images", type=int, default=1024, help="images timed per pipeline and worker setting")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the images are split into")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for the total")
    p.add_argument("--quality-samples", type=int, default=64)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    for flag in ("images", "rounds", "workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def generate_folder(root: Path, per_photo: int = 64) -> Path:
    """ImageNet-like JPEGs (500 x 375 or 375 x 500, quality 90) cut from the photos scikit-image ships."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from rcmae.core.data.demo import DEMO_PHOTOS

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    for name in DEMO_PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = Image.fromarray(photo[0] if isinstance(photo, tuple) else photo).convert("RGB")
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_photo):
            size = (500, 375) if k % 2 else (375, 500)
            scale = rng.uniform(0.5, 1.0)
            w, h = int(photo.width * scale), int(photo.height * scale)
            x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
            photo.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC).save(root / name / f"{name}_{k:04d}.JPEG",
                                                                                quality=90)
    (root / ".complete").touch()
    return root


def official_dataset(root: Path):
    tf = transforms.Compose([transforms.RandomResizedCrop(SIZE, scale=(MIN_SCALE, 1.0), interpolation=3),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return datasets.ImageFolder(str(root), transform=tf)


class Seeded(torch.utils.data.Dataset):
    """Our pipelines index by (index, seed); a plain index here, its seed fixed by the index."""

    def __init__(self, images: SeededImages):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[(i, i)][0]


def images_in(batch) -> int:
    """Images in a loader batch: the first dimension of its image tensor, the batch itself (ours) or its
    first item (ImageFolder's ``[images, labels]``)."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not (isinstance(images, torch.Tensor) and images.dim() == 4):
        raise TypeError(f"no image batch (N, C, H, W) in a loader batch of type {type(batch).__name__}")
    return images.shape[0]


def timed_round(dataset, n: int, workers: int, on_gpu: bool = False) -> tuple[int, float]:
    """(images, seconds) of one round: a fresh loader (no batches prefetched during another pipeline's
    round), its first batch untimed (workers starting), then whole batches until ``n`` images; ``on_gpu``:
    the GPU pipeline, whose batches are decoded on the device here."""
    collate = (lambda items: collate_encoded([(x, 0, 0) for x in items])[0]) if on_gpu else None
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, collate_fn=collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(0))
    device = torch.device("cuda") if on_gpu else None
    it, seen = iter(loader), 0
    next(it)
    start = time.perf_counter()
    while seen < n:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if on_gpu:
            batch = decode_on_device(batch, SIZE, device)
        seen += images_in(batch)
    if on_gpu:
        torch.cuda.synchronize()
    return seen, time.perf_counter() - start


def alternating_rounds(pipelines: dict, images: int, workers: int, rounds: int) -> dict[str, list[tuple[int, float]]]:
    """{pipeline: [(images, seconds) of each round]}, the pipelines taking turns round by round, each timing
    at least ``images / rounds`` images a round."""
    per_round = math.ceil(images / rounds)
    timed = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, dataset in pipelines.items():
            timed[name].append(timed_round(dataset, per_round, workers, on_gpu=name.startswith("gpu")))
    return timed


def median_ratio(ours: list[float], baseline: list[float]) -> float:
    """The median over paired rounds of ours / baseline (both in images per second)."""
    return statistics.median(a / b for a, b in zip(ours, baseline))


def quality(root: Path, n: int) -> dict:
    """PSNR and largest difference (0-255) between the fast and the official pipeline on the same seeded
    samples: the same crop box and flip, decoded and resized by each."""
    listed = list_images(root)
    paths = listed[:: max(1, len(listed) // n)][:n]
    fast, official = (SeededImages(paths, pretrain_transform(SIZE, MIN_SCALE, p)) for p in ("fast", "torchvision"))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    psnrs, worst = [], 0.0
    for i in range(len(paths)):
        ours = fast[(i, i)][0].float()
        theirs = (official[(i, i)][0] * std + mean) * 255
        diff = ours - theirs
        psnrs.append(float(10 * torch.log10(255 ** 2 / diff.pow(2).mean().clamp_min(1e-12))))
        worst = max(worst, float(diff.abs().max()))
    return {"samples": len(paths), "psnr_min": min(psnrs), "psnr_mean": sum(psnrs) / len(psnrs), "max_abs_diff": worst}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = Path(args.data) if args.data else generate_folder(Path(args.generated))
    paths = list_images(root)
    pipelines = {"torchvision (official MAE)": official_dataset(root),
                 "fast": Seeded(SeededImages(paths, pretrain_transform(SIZE, MIN_SCALE, "fast")))}
    if torch.cuda.is_available():  # workers read bytes, nvJPEG decodes: "per core" is the workers' share
        pipelines["gpu (nvJPEG)"] = Seeded(SeededImages(paths, pretrain_transform(SIZE, MIN_SCALE, "gpu")))
    per_core = alternating_rounds(pipelines, args.images, 1, args.rounds)
    total = alternating_rounds(pipelines, args.images, args.workers, args.rounds)
    rates = {setting: {name: [n / seconds for n, seconds in rounds] for name, rounds in timed.items()}
             for setting, timed in (("per_core", per_core), ("total", total))}
    rows = []
    for name in pipelines:
        rows.append({"pipeline": name, "per_core_img_s": statistics.median(rates["per_core"][name]),
                     "workers": args.workers, "total_img_s": statistics.median(rates["total"][name]),
                     "per_core_images": sum(n for n, _ in per_core[name]),
                     "total_images": sum(n for n, _ in total[name]),
                     "per_core_rounds": rates["per_core"][name], "total_rounds": rates["total"][name]})
        print(f"{name:28s} {rows[-1]['per_core_img_s']:8.0f} img/s per core   {rows[-1]['total_img_s']:8.0f} img/s "
              f"with {args.workers} workers (medians of {args.rounds} rounds)", flush=True)
    q = quality(root, args.quality_samples)
    print(f"quality on {q['samples']} identical crop boxes: PSNR min {q['psnr_min']:.1f} dB, "
          f"mean {q['psnr_mean']:.1f} dB, "
          f"largest difference {q['max_abs_diff']:.0f} / 255")
    baseline, ours = list(pipelines)[:2]
    speedup = median_ratio(rates["per_core"][ours], rates["per_core"][baseline])
    result = {"data": str(root), "images": args.images, "rounds": args.rounds, "rows": rows, "quality": q,
              "per_core_speedup": speedup,
              "total_speedup": median_ratio(rates["total"][ours], rates["total"][baseline]),
              "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0))}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"per-core speedup vs torchvision: {speedup:.2f}")
    return result


if __name__ == "__main__":
    main()
