"""Datasets: images from any reader (files, shard members) under a per-sample seed, synthetic images, and
the labelled evaluation sets."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from rcmae.core.data.pipelines import pretrain_transform
from rcmae.core.data.readers import image_sources, labelled_images, labelled_pair
from rcmae.core.data.sampler import seeded
from rcmae.core.data.shards import ShardMember, read_member
from rcmae.core.data.transforms import eval_transform
from rcmae.core.errors import UNREADABLE, DataError

log = logging.getLogger(__name__)


class SeededImages(Dataset):
    """Images read from ``paths`` (files, or members of tar shards: :mod:`rcmae.core.data.shards`), indexed by
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


def labelled_eval_sets(d: dict, out_dir: Path, is_main: bool, img_size: int, section: str = "data",
                       demo_dir: str = "demo_data"):
    """Train and val sets of :func:`labelled_pair`, both with the evaluation transform (k-NN
    features); returns (train, val, number of classes)."""
    train_path, val_path, label_space = labelled_pair(d, out_dir, is_main, section, demo_dir)
    (train, num_classes), (val, _) = [eval_dataset(p, label_space, img_size, d["crop_pct"], f"{section}.{what}")
                                      for p, what in ((train_path, "train_path"), (val_path, "val_path"))]
    return train, val, num_classes


def labelled_dataset(root: str | Path, label_space: str, transform, what: str) -> tuple[SeededImages, int]:
    """An evaluation set of a labelled folder (unreadable images counted apart, never replaced);
    returns it with the number of classes of ``label_space``."""
    paths, labels, num_classes = labelled_images(root, label_space, what)
    return SeededImages(paths, transform, labels, replace_unreadable=False), num_classes


def eval_dataset(root: str | Path, label_space: str, img_size: int, crop_pct: float | None, what: str):
    return labelled_dataset(root, label_space, eval_transform(img_size, crop_pct), what)


def pretrain_dataset(d: dict, img_size: int, out_dir: Path, is_main: bool) -> Dataset:
    """The pretraining set of a ``data`` section: synthetic images, or the images of
    :func:`~rcmae.core.data.readers.image_sources` under the ``data.pipeline`` augmentation."""
    if d["source"] == "synthetic":
        return SyntheticImages(d["synthetic_size"], img_size)
    return SeededImages(image_sources(d, out_dir, is_main), pretrain_transform(img_size, d["crop_min_scale"],
                                                                                d["pipeline"]))
