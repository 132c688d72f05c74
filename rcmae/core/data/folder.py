"""The ImageFolder reader (``root/<class>/<image>``): class folders, samples, and an image list scanned
once per run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from rcmae.core.distributed import barrier


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
