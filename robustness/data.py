"""Benchmark layouts (ImageNet val / -C / -A / -R / -Sketch), class-subset masks and the demo sets."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision import transforms

from rcmae.core.data.datasets import SeededImages, labelled_dataset
from rcmae.core.data.readers import classes_of
from rcmae.core.data.wnids import imagenet_wnids
from rcmae.robustness.metrics import BENCHMARK, EXTRA, SEVERITIES

log = logging.getLogger(__name__)

SUBSET_LISTS = {"imagenet_a": "imagenet_a_synsets.txt", "imagenet_r": "imagenet_r_synsets.txt"}


def class_mask(root: str | Path, benchmark: str) -> torch.Tensor:
    """Bool (1000,) mask of the ImageNet-1k classes whose wnid folders ``root`` holds, after checking
    them against the benchmark's canonical list (timm's ``imagenet_{a,r}_synsets.txt``). ``root``: the
    benchmark's folder, or a shard folder written from it."""
    folders = classes_of(root, benchmark)
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
        raise FileNotFoundError(f"imagenet_c: folder {root} does not exist")
    cells = {}
    for c in (*BENCHMARK, *EXTRA):
        for s in SEVERITIES:
            if (root / c / str(s)).is_dir():
                cells.setdefault(c, {})[s] = root / c / str(s)
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in (*BENCHMARK, *EXTRA))
    if unknown:
        log.warning("%s: ignoring folders that are not ImageNet-C corruptions: %s", root, unknown)
    if not cells:
        raise FileNotFoundError(f"imagenet_c: {root} holds no <corruption>/<severity>/<wnid>/ folders "
                                f"(corruptions: {', '.join(BENCHMARK + EXTRA)}; severities 1-5)")
    return cells


def check_wnid_folder(root: str | Path, what: str) -> None:
    """An ImageNet-style evaluation folder (or a shard folder written from one): exists, and its class
    folders are ImageNet-1k wnids (no image is read or listed)."""
    wnids = set(imagenet_wnids())
    stray = sorted(set(classes_of(root, what)) - wnids)
    if stray:
        raise ValueError(f"{what}: folders {stray[:5]} of {root} are not ImageNet-1k wnids; the benchmarks are "
                         "laid out as <root>/<wnid>/<image> (ImageNet-Sketch: the sketch/ folder)")


def eval_set(root: str | Path, transform, what: str) -> SeededImages:
    """The images of ``root/<wnid>/`` (or of a shard folder of it) labelled with their ImageNet-1k indices."""
    return labelled_dataset(root, "imagenet1k", transform, what)[0]


def stored_transform(data_config: dict):
    """ImageNet-C as the benchmark stores it (224 x 224): tensor + normalisation, no resize."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(data_config["mean"], data_config["std"])])
