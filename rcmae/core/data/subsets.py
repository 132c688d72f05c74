"""Labelled subsets of a training set: class-balanced deterministic fractions (the 1 % / 10 % protocols on any
dataset, the linear-probe grid's held-out split) and image lists named by file (SimCLR's ImageNet 1 % / 10 %
lists, ``configs/subsets/``)."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

from rcmae.core.config import shipped_file
from rcmae.core.data.shards import is_shard_dir
from rcmae.core.errors import ConfigError, summarize_names

log = logging.getLogger(__name__)


def balanced_subset(labels: list[int], fraction: float, seed: int, what: str) -> list[int]:
    """Indices (sorted) of ``fraction * n_c`` images of each class (rounded half up, at least one), the first of
    the class's images ranked by a hash of (seed, class, rank of the image within its class): the same subset on
    every machine, for an ImageFolder tree and the shard folder written from it (same order), whatever other
    classes hold; a smaller fraction gives a subset of a larger one's."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"{what} must be in (0, 1], got {fraction}")
    by_class = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    chosen = []
    for label, members in by_class.items():
        k = max(1, int(fraction * len(members) + 0.5))
        ranked = sorted(range(len(members)),
                        key=lambda rank: hashlib.sha256(f"{seed}/{label}/{rank}".encode()).digest())
        chosen += [members[rank] for rank in ranked[:k]]
    return sorted(chosen)


def held_out_split(labels: list[int], fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(kept, held out): :func:`balanced_subset` held out, the rest kept; every class keeps an image."""
    held = balanced_subset(labels, fraction, seed, what)
    held_set = set(held)
    kept = [i for i in range(len(labels)) if i not in held_set]
    emptied = sorted(set(labels) - {labels[i] for i in kept})
    if emptied:
        raise ConfigError(f"{what}={fraction} holds out every training image of {len(emptied)} class(es) (labels "
                          f"{emptied[:5]}): each class needs 2 images at least, or a smaller fraction")
    return kept, held


def read_subset_file(path: str | Path, what: str) -> list[str]:
    """The file names of an image list (one per line; ``.gz`` read compressed), checked for duplicates."""
    path = Path(path).expanduser()
    path = path if path.is_file() else shipped_file(path)  # the shipped lists from any directory
    if not path.is_file():
        raise ConfigError(f"{what}={path}: no such file (an image list, such as the shipped configs/subsets/"
                          "imagenet_1percent.txt.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}={path}: unreadable image list: {e}") from None
    if not names:
        raise ConfigError(f"{what}={path} lists no images")
    repeated = len(names) - len(set(names))
    if repeated:
        raise ConfigError(f"{what}={path} lists {repeated} file name(s) twice")
    return names


def listed_subset(paths: list, path: str | Path, what: str) -> list[int]:
    """Indices of the images whose file names (``n01440764_10026.JPEG``, or ``<class>/<file>``) ``path``
    lists; every listed image must be in the set (a list made for other data would train on less)."""
    names = read_subset_file(path, what)
    by_name = {}
    for index, p in enumerate(paths):
        by_name[os.path.basename(p)] = index
        by_name["/".join(Path(p).parts[-2:])] = index
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"{what}={path}: {len(missing)} of its {len(names)} images are not in the training set "
                          f"(e.g. {summarize_names(missing)}): is it the list of this data set's train split?")
    return sorted(by_name[n] for n in names)


def check_subset_options(d: dict, section: str = "data") -> None:
    """Before any work: one of ``label_fraction`` / ``subset_file`` at most, a fraction in (0, 1], a readable list
    whose images are in ``train_path`` (``<class>/<file>`` entries, and ImageNet's ``<wnid>_<n>.JPEG``, are
    looked up directly; the scan of the training set checks any other name)."""
    fraction, listed = d.get("label_fraction"), d.get("subset_file")
    if fraction is not None and listed:
        raise ConfigError(f"{section}.label_fraction and {section}.subset_file both choose the labelled images: "
                          "give one")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(f"{section}.label_fraction must be in (0, 1], got {fraction!r}")
    if not listed:
        return
    names = read_subset_file(listed, f"{section}.subset_file")
    root = d.get("train_path")
    if d.get("source") != "folder" or not root:
        raise ConfigError(f"{section}.subset_file names files of an ImageFolder tree: set {section}.train_path "
                          f"(source folder), or use {section}.label_fraction")
    if is_shard_dir(root):
        raise ConfigError(f"{section}.subset_file: {root} is a shard folder, which does not record file names; give "
                          f"the ImageFolder tree it was written from (or use {section}.label_fraction)")
    located = [n if "/" in n else f"{n.split('_')[0]}/{n}" for n in names]
    missing = [n for n, rel in zip(names, located) if not (Path(root) / rel).is_file()]
    if missing and len(missing) < len(names):  # the layout is known: every listed image must be where it says
        raise ConfigError(f"{section}.subset_file={listed}: {len(missing)} of its {len(names)} images are not in "
                              f"{root} (e.g. {summarize_names(missing)}): is it the list of this train split?")


def labelled_subset(paths: list, labels: list[int], d: dict, section: str = "data") -> tuple[list, list[int]]:
    """The part of a training set a ``data`` section asks for (checked by :func:`check_subset_options`):
    ``label_fraction`` (class-balanced, seeded by ``subset_seed``), ``subset_file`` (an image list), or all."""
    if d.get("label_fraction") is not None:
        keep = balanced_subset(labels, d["label_fraction"], d["subset_seed"], f"{section}.label_fraction")
    elif d.get("subset_file"):
        keep = listed_subset(paths, d["subset_file"], f"{section}.subset_file")
    else:
        return paths, labels
    log.info("labelled subset (%s): %d of %d training images, %d classes", f"{section}.label_fraction="
             f"{d['label_fraction']}" if d.get("label_fraction") is not None else f"{section}.subset_file="
             f"{d['subset_file']}", len(keep), len(paths), len({labels[i] for i in keep}))
    return [paths[i] for i in keep], [labels[i] for i in keep]
