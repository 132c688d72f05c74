"""The reader factory: what every job reads, by storage format (an ImageFolder tree, a shard folder written
by ``tools/make_shards.py``, the embedded demo set, synthetic images), and the label spaces (sorted folder
index, or ImageNet-1k wnid index: :mod:`~rcmae.core.data.wnids`) with the checks that a train / val pair
labels the same classes."""
from __future__ import annotations

from pathlib import Path

from rcmae.core.data.demo import build_demo_folder, build_demo_labelled
from rcmae.core.data.folder import image_folder_classes, image_folder_samples, list_images, shared_image_list
from rcmae.core.data.shards import ShardMember, is_shard_dir, load_index
from rcmae.core.data.wnids import imagenet_wnids
from rcmae.core.distributed import barrier
from rcmae.core.errors import ConfigError, summarize_names

LABEL_SPACES = ("folder", "imagenet1k")  # sorted folder index, or ImageNet-1k wnid index


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


def classes_of(root: str | Path, what: str) -> list[str]:
    """The classes of a labelled set: the class folders of an ImageFolder tree, or the classes recorded in a
    shard folder's index (the tree it was written from)."""
    if is_shard_dir(root):
        return load_index(root)[2]
    return image_folder_classes(root, what)


def check_folder_pair(d: dict, section: str) -> None:
    """A config section with ``source`` (folder / demo), ``train_path``, ``val_path``, ``label_space``:
    the demo takes no paths; a folder source needs both, each an ImageFolder tree or a shard folder of one
    (``tools/make_shards.py``), with classes that agree (:func:`check_class_names`)."""
    if d["label_space"] not in LABEL_SPACES:
        raise ConfigError(f"{section}.label_space must be one of {LABEL_SPACES}, got {d['label_space']!r}")
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
                              f"imagenet/{key[:-len('_path')]}, or a shard folder of one), or {section}.source=demo")
    classes = {key: classes_of(d[key], f"{section}.{key}") for key in ("train_path", "val_path")}
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


def labelled_images(root: str | Path, label_space: str,
                    what: str) -> tuple[list[str] | list[ShardMember], list[int], int]:
    """A labelled set -> its images (paths, or shard members), labels, number of classes. ``root`` is an
    ImageFolder tree (``root/<class>/<image>``) or a shard folder written from one (same order, same
    classes).

    ``label_space``: ``folder`` (sorted folder index) or ``imagenet1k`` (folders are wnids, labels
    are their index among the 1000 ImageNet-1k classes, whatever subset of folders is present).
    """
    if is_shard_dir(root):
        members, folder_labels, classes = load_index(root)
        class_to_idx, num_classes = class_index(classes, label_space, root, what)
        relabel = [class_to_idx[c] for c in classes]
        return members, [relabel[y] for y in folder_labels], num_classes
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


def image_sources(d: dict, out_dir: Path, is_main: bool) -> list[str] | list[ShardMember]:
    """The unlabelled images of a pretraining ``data`` section: ``source`` folder (an ImageFolder tree,
    listed once per run: :func:`~rcmae.core.data.folder.shared_image_list`), shards (a shard folder), or
    demo (built by the main process under ``out_dir/demo_data``)."""
    if d["source"] == "shards":
        return load_index(d["path"])[0]
    if d["source"] == "demo":
        if is_main:
            build_demo_folder(Path(out_dir) / "demo_data")
        barrier()
        return list_images(Path(out_dir) / "demo_data")
    return shared_image_list(d["path"], out_dir, is_main)
