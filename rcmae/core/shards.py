"""Sharded-tar storage for ImageFolder trees: a few large files instead of 1.28M small ones, which cluster file
systems serve far better.

The shards follow the webdataset layout (each image is the members ``<key>.<ext>`` and ``<key>.cls``, next to
each other, in one tar), so webdataset readers can stream them too. We read them by *random access* instead:
``index.json`` records where each image's bytes lie, so a dataset indexes sample ``i`` like a folder of files
and the sample order and augmentations stay functions of (seed, step) alone, whatever the number of workers.

Keys: ``<class>/<stem>`` (the image's path under the class folder, without its extension), with every "." in
the file's stem replaced by "_" (webdataset splits a member name at the first "." of its base name into key and
extension), an empty stem written "_", and a key already taken (``a.b.jpg`` next to ``a_b.jpg``, or ``x.jpg``
next to ``x.png``) given the first free suffix ``~1``, ``~2``, ... in the sorted order of the files.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image

from rcmae.core.errors import UNREADABLE

log = logging.getLogger(__name__)

FORMAT = "rcmae-shards/1"
INDEX_NAME = "index.json"
SHARD_PATTERN = re.compile(r"shard-\d{6}\.tar(\.tmp)?")
_HEAD = re.compile(rb'\A\s*\{\s*"format"\s*:\s*"' + re.escape(FORMAT.encode()) + rb'"')


class ShardError(OSError):
    """A shard index or shard that cannot be used as it is (the message names the file and what is wrong)."""


class ShardMember(NamedTuple):
    """Where one image's bytes lie: the tar file (absolute path), the byte offset of its data and its size."""
    shard: str
    offset: int
    size: int


def read_member(member: ShardMember) -> bytes:
    """The bytes of one image, read by seeking into its shard (no tar parsing, no other file touched)."""
    with open(member.shard, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise ShardError(f"{member.shard}: short read at offset {member.offset}: got {len(data)} of "
                         f"{member.size} bytes (truncated shard?)")
    return data


def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a shard index of ours. Cheap: our writer puts ``format`` first, so the head of the
    file (not the whole, ~35 MB for ImageNet) usually answers; any other index.json is parsed in full."""
    index = Path(path) / INDEX_NAME
    try:
        with open(index, "rb") as f:
            if _HEAD.match(f.read(256)):
                return True
        with open(index, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _bad(index: Path, what: str) -> ShardError:
    return ShardError(f"{index}: {what}; rewrite the shards with tools/make_shards.py")


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while millions of acyclic objects are made: its passes would double the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ShardMembers(Sequence):
    """The members of a shard set as three arrays (24 bytes a sample), each :class:`ShardMember` built when
    indexed: 1.28M tuples would be ~200 MB of Python objects, copied into every loader worker as their
    reference counts change."""

    def __init__(self, shards: list[str], shard_idx: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self.shards = shards
        self.shard_idx, self.offsets, self.sizes = (np.ascontiguousarray(a, np.int64)
                                                    for a in (shard_idx, offsets, sizes))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return ShardMember(self.shards[self.shard_idx[i]], int(self.offsets[i]), int(self.sizes[i]))


def load_index(out_dir: str | Path) -> tuple[ShardMembers, list[int], list[str]]:
    """(members, labels, classes) of a shard directory, in ImageFolder order, after checking the index and that
    every shard exists and is long enough for the members it holds (a truncated copy fails here, not mid-epoch).
    About 1.2 s for ImageNet's 1.28M samples."""
    with _gc_paused():
        return _load_index(out_dir)


def _load_index(out_dir: str | Path) -> tuple[ShardMembers, list[int], list[str]]:
    out_dir = Path(out_dir).resolve()
    index = out_dir / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no shard index (an unfinished or missing shard set); "
                                f"write one with tools/make_shards.py")
    try:
        with open(index, "rb") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(index, f"unreadable shard index ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _bad(index, f"not a shard index of format {FORMAT!r} (format: {found!r})")
    classes, shards, samples = data.get("classes"), data.get("shards"), data.get("samples")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise _bad(index, "'classes' must be a list of class names")
    if not (isinstance(shards, list) and all(isinstance(s, str) and SHARD_PATTERN.fullmatch(s) for s in shards)):
        raise _bad(index, "'shards' must be a list of shard file names (shard-NNNNNN.tar)")
    if not isinstance(samples, list):
        raise _bad(index, "'samples' must be a list of [shard_idx, offset, size, label]")

    num_shards, num_classes = len(shards), len(classes)
    expected = f"[shard_idx < {num_shards}, offset >= 0, size >= 0, label < {num_classes}] (integers)"
    try:  # one array, not a Python loop: ~0.3 s instead of ~3 s for ImageNet's 1.28M samples
        table = np.asarray(samples) if samples else np.zeros((0, 4), np.int64)
    except ValueError:  # rows of different lengths
        table = None
    if table is None or table.ndim != 2 or table.shape[1] != 4 or table.dtype.kind not in "iu":
        bad = next((i for i, row in enumerate(samples) if not (isinstance(row, list) and len(row) == 4
                    and all(type(v) is int for v in row))), 0)
        raise _bad(index, f"sample {bad} is {samples[bad]!r}, expected {expected}")
    shard_idx, offsets, sizes, label_col = table.T
    wrong = ((shard_idx < 0) | (shard_idx >= num_shards) | (offsets < 0) | (sizes < 0)
             | (label_col < 0) | (label_col >= num_classes))
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise _bad(index, f"sample {bad} is {samples[bad]!r}, expected {expected}")
    ends = np.zeros(num_shards, np.int64)
    np.maximum.at(ends, shard_idx, offsets + sizes)

    paths = [str(out_dir / name) for name in shards]
    members = ShardMembers(paths, shard_idx, offsets, sizes)
    labels = label_col.tolist()

    for path, end in zip(paths, ends.tolist()):
        try:
            length = os.stat(path).st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: shard listed in {index} is missing") from None
        if length < end:
            raise ShardError(f"{path}: shard is truncated: {length} bytes, its members reach byte {end}")
    return members, labels, classes


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends on the name and size alone, so the same images give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _padded(size: int) -> int:
    """Bytes ``size`` bytes of member data take in a tar: padded to whole 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_bytes(size: int) -> int:
    """Bytes a member takes in a tar: a 512-byte header (names under 100 characters) and its padded data."""
    return tarfile.BLOCKSIZE + _padded(size)


def sample_keys(folder: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(key, extension) of each image path under ``folder``, unique, by the rule in the module docstring."""
    taken: set[str] = set()
    keys = []
    for path in paths:
        rel = PurePosixPath(Path(path).relative_to(folder).as_posix())
        stem, _, ext = rel.name.rpartition(".")  # every image has an extension: IMG_EXTENSIONS matched it
        base = str(rel.parent / (stem.replace(".", "_") or "_"))
        key, n = base, 0
        while key in taken:
            n += 1
            key = f"{base}~{n}"
        taken.add(key)
        keys.append((key, ext.lower()))
    return keys


def image_problem(data: bytes) -> str | None:
    """Why the bytes of an image file are no readable image, or None. JPEGs (told by their content, not their
    name) are checked cheaply: a header libjpeg accepts, and an end-of-image marker after the last start of
    scan (a thumbnail's scan and end come before it; a file cut short has none): ~6 us for an ImageNet-sized
    JPEG, where decoding it even at 1/8 scale takes ~1.5 ms. Other formats, rare in ImageNet, are decoded."""
    if not data:
        return "empty file (0 bytes)"
    if data.startswith(b"\xff\xd8"):
        try:
            simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            return f"corrupt JPEG header ({e})"
        # entropy-coded data never holds FF D9; the search (~0.2 ms) only for files with bytes after their end
        if not data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9", data.rfind(b"\xff\xda")) < 0:
            return "truncated JPEG (no end-of-image marker after its last scan)"
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UNREADABLE as e:
        return f"cannot be decoded ({e})"
    return None


class WrittenShards(NamedTuple):
    """What :func:`write_shards` wrote: the index, the number of images packed, and the images it left out
    ({path under the source folder: why}; also in the index under ``skipped``)."""
    index: Path
    samples: int
    skipped: dict[str, str]


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Before anything is written: a new or empty output folder, or with ``overwrite`` one that holds a shard
    set of ours (its index dropped first, so that an interrupted rewrite leaves no index that points at a mix
    of old and new shards). Any other file there is refused either way: a wrong folder, or data we were not
    asked to replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} is a file, not a folder; choose a new or empty output folder")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    others = [n for n in present if not (SHARD_PATTERN.fullmatch(n) or n in (INDEX_NAME, INDEX_NAME + ".tmp"))]
    if others:
        listed = ", ".join(others[:5]) + (f", ... ({len(others) - 5} more)" if len(others) > 5 else "")
        raise FileExistsError(f"{out_dir} holds files that are not shards of ours ({listed}); choose a new or "
                              f"empty output folder")
    if not present:
        return
    index = out_dir / INDEX_NAME
    try:
        with open(index, "rb") as f:
            old = json.load(f)
    except FileNotFoundError:
        old = {"format": FORMAT, "source": None}  # shards of an unfinished run: no index written yet
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and old.get("format") == FORMAT):
        raise FileExistsError(f"{out_dir} already holds an {INDEX_NAME} that is not a shard index of ours; "
                              f"choose a new or empty output folder")
    if not overwrite:
        held = f"the shards of {old['source']!r}" if old.get("source") else "the shards of an unfinished run"
        raise FileExistsError(f"{out_dir} already holds {held} ({len(present)} files); pass --overwrite "
                              f"(overwrite=True) to replace them, or choose a new or empty output folder")
    index.unlink(missing_ok=True)


def write_shards(folder: str | Path, out_dir: str | Path, shard_bytes: int = 1 << 30, overwrite: bool = False,
                 progress: bool = True) -> WrittenShards:
    """Write the ImageFolder tree ``folder`` as tar shards of about ``shard_bytes`` each (an image is never split;
    one larger than that gets a shard of its own) plus ``index.json``, written last and atomically, so a shard
    set without an index is an unfinished one. Deterministic: the same images give byte-identical files.
    ``out_dir`` must be new or empty; ``overwrite`` replaces a shard set of ours there.

    Images that cannot be read (:func:`image_problem`: empty, truncated, not an image) are left out, logged and
    listed in the index under ``skipped``: one bad file among a million should not cost the packing run, and a
    loader could only skip it at every epoch anyway."""
    from rcmae.core.data import image_folder_classes, image_folder_samples
    from rcmae.core.run import progress as progress_bar

    folder = Path(folder).resolve()
    out_dir = Path(out_dir)
    source = str(folder)
    classes = image_folder_classes(folder, "source folder")
    samples = image_folder_samples(folder, {c: i for i, c in enumerate(classes)}, "source folder")
    keys = sample_keys(folder, [path for path, _ in samples])
    _check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    shard_names: list[str] = []
    rows: list[list[int]] = []
    skipped: dict[str, str] = {}
    tar: tarfile.TarFile | None = None
    expected: dict[str, tuple[int, int]] = {}  # member name -> (offset_data, size) in the open shard

    def finish_shard():
        """Close the open shard, check our offsets against tarfile's own reading of it, and move it in place."""
        tar.close()  # writes the end-of-archive blocks; the file object is ours to close
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
        tar.fileobj.close()
        tmp = out_dir / (shard_names[-1] + ".tmp")
        with tarfile.open(tmp, "r:") as check:
            found = {m.name: (m.offset_data, m.size) for m in check.getmembers()}
        if found != expected:
            raise RuntimeError(f"{tmp}: member offsets differ from what tarfile reads (a bug in write_shards)")
        os.replace(tmp, out_dir / shard_names[-1])

    try:
        with progress_bar(total=len(samples), unit="img", desc="shards", disable=not progress) as bar:
            for (path, label), (key, ext) in zip(samples, keys):
                data = Path(path).read_bytes()
                problem = image_problem(data)
                if problem is not None:
                    skipped[Path(path).relative_to(folder).as_posix()] = problem
                    log.warning("skipping unreadable image %s: %s", path, problem)
                    bar.update()
                    continue
                cls = str(label).encode("ascii")
                need = _tar_bytes(len(data)) + _tar_bytes(len(cls))
                if tar is None or (tar.offset > 0 and tar.offset + need > shard_bytes):
                    if tar is not None:
                        finish_shard()
                    shard_names.append(f"shard-{len(shard_names):06d}.tar")
                    shard_file = open(out_dir / (shard_names[-1] + ".tmp"), "wb")
                    tar = tarfile.TarFile(fileobj=shard_file, mode="w", format=tarfile.GNU_FORMAT)
                    expected = {}
                image_name, cls_name = f"{key}.{ext}", f"{key}.cls"
                tar.addfile(_member_info(image_name, len(data)), io.BytesIO(data))
                offset_data = tar.offset - _padded(len(data))  # the header before it may span blocks (long names)
                expected[image_name] = (offset_data, len(data))
                tar.addfile(_member_info(cls_name, len(cls)), io.BytesIO(cls))
                expected[cls_name] = (tar.offset - tarfile.BLOCKSIZE, len(cls))
                rows.append([len(shard_names) - 1, offset_data, len(data), label])
                bar.update()
            if tar is not None:
                finish_shard()
                tar = None
    finally:
        if tar is not None:  # failed mid-shard: close its file; the .tmp is no shard an index lists
            tar.fileobj.close()

    for stale in out_dir.iterdir():  # shards of an earlier, larger run of the same source
        if SHARD_PATTERN.fullmatch(stale.name) and stale.name not in shard_names:
            stale.unlink()
    index = out_dir / INDEX_NAME
    tmp = out_dir / (INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:  # "format" first: is_shard_dir reads the head only
        f.write(json.dumps({"format": FORMAT, "source": source, "classes": classes, "shards": shard_names,
                            "samples": rows, "skipped": skipped}, separators=(",", ":")))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index)
    return WrittenShards(index, len(rows), skipped)

