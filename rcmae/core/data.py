"""Pretraining data: image folders, the embedded demo set, synthetic images, and a resumable sampler.

Every random choice is a function of (seed, epoch, index): the augmentation of a sample does not
depend on the number of processes, data-loader workers, or where a run was resumed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from rcmae.core.demo_data import build_demo_labelled
from rcmae.core.distributed import barrier
from rcmae.core.errors import UNREADABLE, ConfigError, DataError, summarize_names
from rcmae.core.shards import ShardMember, read_member

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int, torch_only: bool = False):
    """Seed torch's CPU generator, numpy and ``random`` (torchvision and timm augmentations draw from all
    three; with ``torch_only``, torch's alone, for transforms that draw nothing else) for the duration of
    the block, then restore the previous states. (``torch.default_generator`` directly: seeding through
    ``torch.manual_seed`` also reseeds every accelerator's generator and costs ~70x more.)"""
    torch_state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    if not torch_only:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if not torch_only:
            random.setstate(py_state)
            np.random.set_state(np_state)


def eval_crop_pct(img_size: int, crop_pct: float | None = None) -> float:
    """``crop_pct`` when given, else MAE's rule (``util/datasets.py build_transform``): 224/256 up
    to 224 px, 1.0 (no crop margin) above."""
    if crop_pct is not None:
        return crop_pct
    return 224 / 256 if img_size <= 224 else 1.0


def mae_eval_config(img_size: int, crop_pct: float | None = None) -> dict:
    """MAE's evaluation preprocessing as a timm data config (``timm.data.create_transform(**it)``;
    also what exported weights declare): bicubic resize to ``img_size / crop_pct``, centre crop,
    ImageNet mean / std."""
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": eval_crop_pct(img_size, crop_pct), "crop_mode": "center"}


def image_folder_classes(root: str | Path, what: str) -> list[str]:
    """The class folders of an ImageFolder tree (``root/<class>/<image>``), after the checks that need
    no scan of the images: the folder exists, has class folders, and is not a dataset root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: image folder {root} does not exist")
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}: {root} is not an ImageFolder tree (root/<class>/<image>): {e}") from None
    if {"train", "val"} <= set(classes):
        raise FileNotFoundError(f"{what}: {root} looks like a dataset root (it holds train/ and val/ as "
                                f"classes); point it at a split, e.g. {root / 'train'}")
    return classes


def check_folder_pair(d: dict, section: str) -> None:
    """A config section with ``source`` (folder / demo), ``train_path``, ``val_path``, ``label_space``:
    the demo takes no paths; a folder source needs both, each an ImageFolder tree, with classes that
    agree (:func:`check_class_names`)."""
    if d["source"] == "demo":
        given = [f"{section}.{k}={d[k]}" for k in ("train_path", "val_path") if d[k]]
        if given:
            raise ConfigError(f"{section}.source=demo builds its own images and would ignore {', '.join(given)}: "
                              f"drop --demo / {section}.source=demo (the default is folder)")
        return
    if d["source"] != "folder":
        raise ConfigError(f"{section}.source must be folder or demo, got {d['source']!r}")
    for key in ("train_path", "val_path"):
        if not d[key]:
            raise ConfigError(f"{section}.{key} is required (a labelled ImageFolder tree, e.g. "
                              f"imagenet/{key[:-len('_path')]}), or {section}.source=demo")
    classes = {key: image_folder_classes(d[key], f"{section}.{key}") for key in ("train_path", "val_path")}
    check_class_names(classes, {key: d[key] for key in classes}, d["label_space"], section)


def check_class_names(classes: dict[str, list[str]], roots: dict[str, str], label_space: str, section: str) -> None:
    """The class folders of ``train_path`` and ``val_path`` (``classes`` and ``roots`` by those keys) label
    the same things. ``folder``: labels are sorted folder indices, so the two need the same folder names
    (equal counts are not enough: other names would silently score against the wrong classes).
    ``imagenet1k``: labels are the wnids' ImageNet-1k indices, so val may hold a subset of train's classes,
    never one the model was not trained on. Each side needs two classes at least (one scores 100 %)."""
    for key, names in classes.items():
        class_index(names, label_space, roots[key], f"{section}.{key}")  # the label space fits the folders
        if len(names) < 2:
            raise ConfigError(f"{section}.{key} ({roots[key]}) holds {len(names)} class folder(s) "
                              f"({', '.join(names)}): classification needs at least 2")
    train, val = set(classes["train_path"]), set(classes["val_path"])
    only_val = sorted(val - train)
    only_train = sorted(train - val) if label_space == "folder" else []
    if only_val or only_train:
        sides = [f"only in {section}.{key}: {summarize_names(names)}"
                 for key, names in (("val_path", only_val), ("train_path", only_train)) if names]
        rule = ("the same class folders are needed on both sides" if label_space == "folder"
                else "every val class must be one the model is trained on")
        raise ConfigError(f"{section}.val_path ({roots['val_path']}) and {section}.train_path "
                          f"({roots['train_path']}) do not hold the same classes: {'; '.join(sides)}. "
                          f"With {section}.label_space={label_space} {rule}.")


def image_folder_samples(root: str | Path, class_to_idx: dict[str, int], what: str) -> list[tuple[str, int]]:
    """(path, label) of every image under the given class folders of ``root``."""
    try:
        return make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # a class folder without images
        raise FileNotFoundError(f"{what}: {root}: {e}") from None


def list_images(root: str | Path, what: str = "data.path") -> list[str]:
    """Image paths of an ImageFolder tree (``root/<class>/<image>``)."""
    classes = image_folder_classes(root, what)
    return [path for path, _ in image_folder_samples(root, {c: i for i, c in enumerate(classes)}, what)]


def shared_image_list(root: str | Path, out_dir: Path, is_main: bool, what: str = "data.path") -> list[str]:
    """:func:`list_images`, scanned once per run: the main process lists the tree and writes
    ``<out_dir>/image_list.json``; the other processes (and every resume of the run) read that file,
    so N ranks do not each walk 1.28M files, and a resumed run keeps its sample order even if the
    folder changed meanwhile (an extra file would shift every index)."""
    cache = Path(out_dir) / "image_list.json"
    root = str(Path(root).resolve())
    listed = json.loads(cache.read_text()) if is_main and cache.is_file() else None
    if is_main and (listed is None or listed["root"] != root):  # first start, or another data.path
        listed = {"root": root, "files": [os.path.relpath(p, root) for p in list_images(root, what)]}
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps(listed))
        os.replace(tmp, cache)
    barrier()
    if listed is None:
        listed = json.loads(cache.read_text())
    return [os.path.join(root, f) for f in listed["files"]]


class SeededImages(Dataset):
    """Images read from ``paths`` (files, or members of tar shards: :mod:`rcmae.core.shards`), indexed by
    ``(index, seed)`` pairs from :class:`GlobalBatchSampler`.

    Items are ``(image, label, skipped)`` (label -1 without ``labels``). For training, an unreadable
    or corrupt file is replaced by the next readable one in the list (with its label); ``skipped``
    counts the files passed over, so the training log can report them. For evaluation
    (``replace_unreadable=False``) it comes back as a blank image with label -1 and ``skipped=1``:
    counted apart, never as another image.
    """

    max_skips = 50
    images_probed = 8

    def __init__(self, paths: list[str], transform, labels: list[int] | None = None,
                 replace_unreadable: bool = True):
        if not paths:
            raise DataError("no images in the dataset")
        self.paths, self.transform, self.replace_unreadable = paths, transform, replace_unreadable
        self.labels = labels if labels is not None else [-1] * len(paths)
        self._blank = None
        self.check_readable()

    def check_readable(self) -> None:
        """Fail before any training or evaluation when the images cannot be read at all (rather than in the
        first batch, or as an accuracy over no images): up to ``images_probed`` of them, spread over the
        list, are read; one readable image is enough (unreadable ones are handled as the class says)."""
        n = len(self.paths)
        k = self.images_probed
        probed = range(n) if n <= k else [i * n // k for i in range(k)]
        first_error = None
        for index in probed:
            try:
                self.read(index, 0)
                return
            except UNREADABLE as e:
                first_error = first_error or f"{self.paths[index]}: {e}"
        counted = (f"all {n} images of the dataset are unreadable" if len(probed) == n else
                   f"none of {len(probed)} images tried, spread over the {n} of the dataset, is readable")
        raise DataError(f"{counted} (first: {first_error}): check the data folder")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int, seed: int):
        """The transformed image ``index`` under the sample's seed. A transform with ``decodes = True``
        gets the file's bytes (it decodes only what it needs); others get the decoded RGB image."""
        source = self.paths[index]
        if getattr(self.transform, "decodes", False):  # such transforms draw from torch alone
            data = read_member(source) if isinstance(source, ShardMember) else Path(source).read_bytes()
            with seeded(seed, torch_only=True):
                return self.transform(data)
        opened = io.BytesIO(read_member(source)) if isinstance(source, ShardMember) else source
        with Image.open(opened) as img, seeded(seed):
            return self.transform(img.convert("RGB"))

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        for skipped in range(min(self.max_skips, len(self.paths))):
            path_index = (index + skipped) % len(self.paths)
            try:
                return self.read(path_index, seed), self.labels[path_index], skipped
            except UNREADABLE as e:
                log.warning("skipping unreadable image %s: %s", self.paths[path_index], e)
                if not self.replace_unreadable:
                    return self.blank(), -1, 1
        tried = min(self.max_skips, len(self.paths))
        scope = f"all {tried} of the dataset" if tried == len(self.paths) else f"of {len(self.paths)} in the dataset"
        raise DataError(f"{tried} unreadable images in a row from {self.paths[index]} ({scope}): check the data folder")

    def blank(self):
        if self._blank is None:
            img = Image.new("RGB", (256, 256))
            if getattr(self.transform, "decodes", False):  # such transforms take a file's bytes
                encoded = io.BytesIO()
                img.save(encoded, "PNG")
                img = encoded.getvalue()
            self._blank = torch.zeros_like(self.transform(img))
        return self._blank


def to_model_input(imgs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it, on ``device``: uint8 batches (the fast pipelines hand over raw
    pixels, 4x less to copy) are normalised there with the ImageNet mean / std; float batches are
    already normalised."""
    imgs = imgs.to(device, non_blocking=True)
    if imgs.dtype != torch.uint8:
        return imgs
    mean, std = pixel_mean_std(device)
    return (imgs.float() - mean) / std


@lru_cache(maxsize=None)
def pixel_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean / std in 0-255 units on ``device``, made once: a fresh ``torch.tensor(..., device=cuda)``
    every step would be a blocking host-to-device copy in the training step."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))


class SyntheticImages(Dataset):
    """Deterministic random images (benchmarks and tests); no file I/O."""

    def __init__(self, length: int, img_size: int):
        self.length, self.img_size = length, img_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        g = torch.Generator().manual_seed(index)
        low = torch.randn(3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=self.img_size, mode="bilinear",
                                              align_corners=False)[0]
        if seed % 2:  # the per-sample seed doubles as the flip coin
            img = img.flip(-1)
        return img, -1, 0


class GlobalBatchSampler(Sampler):
    """Infinite stream of this rank's ``(index, seed)`` pairs, starting at optimizer step ``start_step``.

    Epoch ``e`` is a permutation seeded by (seed, e), cut into global batches of
    ``micro_batch * accum * world`` samples (the remainder is dropped). Within step ``s``, micro-batch
    ``m`` of rank ``r`` takes positions ``(m * world + r) * micro_batch`` onward: one process with
    ``accum = k`` sees exactly the samples of ``k`` processes with ``accum = 1``.
    """

    def __init__(self, num_samples: int, micro_batch: int, accum: int, world: int, rank: int,
                 seed: int, start_step: int = 0):
        self.micro_batch, self.accum, self.world, self.rank = micro_batch, accum, world, rank
        self.global_batch = micro_batch * accum * world
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} images cannot fill one batch of {self.global_batch}")
        self.num_samples, self.seed, self.start_step = num_samples, seed, start_step

    def __len__(self) -> int:  # one epoch for this rank
        return self.steps_per_epoch * self.accum * self.micro_batch

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
            for s in range(step_in_epoch, self.steps_per_epoch):
                for m in range(self.accum):
                    start = s * self.global_batch + (m * self.world + self.rank) * self.micro_batch
                    for i in perm[start:start + self.micro_batch]:
                        yield i, sample_seed(self.seed, epoch, i)
            step = (epoch + 1) * self.steps_per_epoch


class TimedIterator:
    """An iterator that adds up the seconds spent waiting for its items (the input pipeline's share of
    a training step); ``take_wait()`` returns and resets the sum."""

    def __init__(self, iterator):
        self.iterator, self.wait = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = next(self.iterator)
        self.wait += time.perf_counter() - t0
        return item

    def take_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait


def train_batches(dataset, micro_batch: int, accum: int, world: int, rank: int, seed: int,
                  start_step: int, num_workers: int, pin_memory: bool, collate_fn=None):
    """Endless iterator over this process's micro-batches from optimizer step ``start_step`` on (timed:
    see :class:`TimedIterator`)."""
    sampler = GlobalBatchSampler(len(dataset), micro_batch, accum, world, rank, seed, start_step)
    return TimedIterator(iter(DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                                         collate_fn=collate_fn)))


@lru_cache(maxsize=None)
def imagenet_wnids(name: str = "imagenet_synsets.txt") -> tuple[str, ...]:
    """The canonical ImageNet wnid lists shipped with timm (1k order; A and R subsets)."""
    path = Path(timm.data.__file__).parent / "_info" / name
    return tuple(path.read_text().split())


def class_index(classes: list[str], label_space: str, root: str | Path, what: str) -> tuple[dict[str, int], int]:
    """The label of each class folder of ``root`` under ``label_space``, and the number of classes."""
    if label_space == "folder":
        return {c: i for i, c in enumerate(classes)}, len(classes)
    if label_space == "imagenet1k":
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ConfigError(f"{what}: folders {summarize_names(unknown)} of {root} are not ImageNet-1k wnids "
                              "(use label_space=folder)")
        return {c: index[c] for c in classes}, len(index)
    raise ConfigError(f"{what}: label_space must be folder or imagenet1k, got {label_space!r}")


def labelled_images(root: str | Path, label_space: str, what: str) -> tuple[list[str], list[int], int]:
    """``root/<class>/<image>`` -> paths, labels, number of classes.

    ``label_space``: ``folder`` (sorted folder index) or ``imagenet1k`` (folders are wnids, labels
    are their index among the 1000 ImageNet-1k classes, whatever subset of folders is present).
    """
    class_to_idx, num_classes = class_index(image_folder_classes(root, what), label_space, root, what)
    samples = image_folder_samples(root, class_to_idx, what)
    return [p for p, _ in samples], [y for _, y in samples], num_classes


def labelled_pair(d: dict, out_dir: Path, is_main: bool, section: str = "data",
                  demo_dir: str = "demo_data") -> tuple:
    """(train_path, val_path, label_space) of a config section with ``source`` (folder / demo),
    ``train_path``, ``val_path``, ``label_space``; the demo set is built (by the main process) under
    ``out_dir / demo_dir``."""
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


