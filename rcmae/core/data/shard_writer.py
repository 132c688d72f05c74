"""Writing an ImageFolder tree as shards (the format: :mod:`rcmae.core.data.shards`): images checked,
unreadable ones skipped and listed in ``index.json``, byte-identical shards for the same images."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import simplejpeg
from PIL import Image

from rcmae.core.data.folder import image_folder_classes, image_folder_samples
from rcmae.core.data.shards import FORMAT, INDEX_NAME, SHARD_PATTERN
from rcmae.core.errors import UNREADABLE
from rcmae.core.progress import progress as progress_bar

log = logging.getLogger(__name__)


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


class _OpenShard:
    """The shards of one run, written one at a time: members appended at offsets recorded as they are
    written, each shard checked against tarfile's own reading of it and moved in place once full."""

    def __init__(self, out_dir: Path, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.names: list[str] = []
        self.tar: tarfile.TarFile | None = None
        self.expected: dict[str, tuple[int, int]] = {}  # member name -> (offset_data, size) in the open shard

    def add(self, key: str, ext: str, data: bytes, label: int) -> list[int]:
        """Append an image and its label; returns its index row ``[shard_idx, offset, size, label]``."""
        cls = str(label).encode("ascii")
        need = _tar_bytes(len(data)) + _tar_bytes(len(cls))
        if self.tar is None or (self.tar.offset > 0 and self.tar.offset + need > self.shard_bytes):
            self.finish()
            self.names.append(f"shard-{len(self.names):06d}.tar")
            shard_file = open(self.out_dir / (self.names[-1] + ".tmp"), "wb")
            self.tar = tarfile.TarFile(fileobj=shard_file, mode="w", format=tarfile.GNU_FORMAT)
            self.expected = {}
        image_name, cls_name = f"{key}.{ext}", f"{key}.cls"
        self.tar.addfile(_member_info(image_name, len(data)), io.BytesIO(data))
        offset_data = self.tar.offset - _padded(len(data))  # the header before it may span blocks (long names)
        self.expected[image_name] = (offset_data, len(data))
        self.tar.addfile(_member_info(cls_name, len(cls)), io.BytesIO(cls))
        self.expected[cls_name] = (self.tar.offset - tarfile.BLOCKSIZE, len(cls))
        return [len(self.names) - 1, offset_data, len(data), label]

    def finish(self) -> None:
        """Close the open shard (if any), check our offsets against tarfile's reading, move it in place."""
        if self.tar is None:
            return
        tar, self.tar = self.tar, None
        tar.close()  # writes the end-of-archive blocks; the file object is ours to close
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
        tar.fileobj.close()
        tmp = self.out_dir / (self.names[-1] + ".tmp")
        with tarfile.open(tmp, "r:") as check:
            found = {m.name: (m.offset_data, m.size) for m in check.getmembers()}
        if found != self.expected:
            raise RuntimeError(f"{tmp}: member offsets differ from what tarfile reads (a bug in write_shards)")
        os.replace(tmp, self.out_dir / self.names[-1])

    def abandon(self) -> None:
        """After a failure mid-shard: close its file; the .tmp is no shard an index lists."""
        if self.tar is not None:
            self.tar.fileobj.close()


def _write_index(out_dir: Path, index: dict) -> Path:
    """``index.json``, atomically, after removing the shards of an earlier, larger run of the same source."""
    for stale in out_dir.iterdir():
        if SHARD_PATTERN.fullmatch(stale.name) and stale.name not in index["shards"]:
            stale.unlink()
    path, tmp = out_dir / INDEX_NAME, out_dir / (INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:  # "format" first: is_shard_dir reads the head only
        f.write(json.dumps(index, separators=(",", ":")))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_shards(folder: str | Path, out_dir: str | Path, shard_bytes: int = 1 << 30, overwrite: bool = False,
                 progress: bool = True) -> WrittenShards:
    """Write the ImageFolder tree ``folder`` as tar shards of about ``shard_bytes`` each (an image is never split;
    one larger than that gets a shard of its own) plus ``index.json``, written last and atomically, so a shard
    set without an index is an unfinished one. Deterministic: the same images give byte-identical files.
    ``out_dir`` must be new or empty; ``overwrite`` replaces a shard set of ours there.

    Images that cannot be read (:func:`image_problem`: empty, truncated, not an image) are left out, logged and
    listed in the index under ``skipped``: one bad file among a million should not cost the packing run, and a
    loader could only skip it at every epoch anyway."""
    folder = Path(folder).resolve()
    out_dir = Path(out_dir)
    classes = image_folder_classes(folder, "source folder")
    samples = image_folder_samples(folder, {c: i for i, c in enumerate(classes)}, "source folder")
    keys = sample_keys(folder, [path for path, _ in samples])
    _check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, rows, skipped = _OpenShard(out_dir, shard_bytes), [], {}
    try:
        with progress_bar(total=len(samples), unit="img", desc="shards", disable=not progress) as bar:
            for (path, label), (key, ext) in zip(samples, keys):
                data = Path(path).read_bytes()
                problem = image_problem(data)
                if problem is None:
                    rows.append(shards.add(key, ext, data, label))
                else:
                    skipped[Path(path).relative_to(folder).as_posix()] = problem
                    log.warning("skipping unreadable image %s: %s", path, problem)
                bar.update()
            shards.finish()
    finally:
        shards.abandon()
    index = _write_index(out_dir, {"format": FORMAT, "source": str(folder), "classes": classes,
                                   "shards": shards.names, "samples": rows, "skipped": skipped})
    return WrittenShards(index, len(rows), skipped)
