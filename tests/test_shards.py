"""Sharded-tar storage: exact bytes and ImageFolder labels back by random access, the webdataset layout,
deterministic shards, whole samples per shard, and clear errors for truncated shards and bad indexes."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcmae.core.data.shard_writer import write_shards
from rcmae.core.data.shards import FORMAT, ShardError, ShardMember, is_shard_dir, load_index, read_member

SHARD_BYTES = 4096  # a few ~1 KB images per shard: several shards


def make_folder(root: Path) -> Path:
    """3 classes of small noise images: JPEGs (one .JPEG), a PNG, a stem with dots and the stem it then collides
    with, and a non-image file ImageFolder skips."""
    rng = np.random.default_rng(0)

    def image(path: Path, fmt: str, size: int = 16):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, fmt)

    for k in range(3):
        image(root / "cat" / f"cat_{k}.jpg", "JPEG")
        image(root / "dog" / f"dog_{k}.JPEG", "JPEG")
        image(root / "eel" / f"eel_{k}.jpg", "JPEG", size=8 + 8 * k)
    image(root / "dog" / "dog.v2.final.jpg", "JPEG")
    image(root / "dog" / "dog_v2_final.jpg", "JPEG")  # the dotted stem's key, taken first in sorted order
    image(root / "eel" / "eel_map.png", "PNG")
    (root / "eel" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


@pytest.fixture
def shards(folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(folder, out, shard_bytes=SHARD_BYTES, progress=False)
    return out


def test_random_access_gives_the_files_bytes_and_imagefolder_labels(folder, shards):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(folder))
    members, labels, classes = load_index(shards)
    assert classes == reference.classes == ["cat", "dog", "eel"]
    assert labels == [label for _, label in reference.samples]
    assert len(members) == len(reference.samples) == 12
    assert len({m.shard for m in members}) > 2, "tiny shard_bytes must give several shards"
    for member, (path, _) in zip(members, reference.samples):
        assert Path(member.shard).is_absolute()
        assert read_member(member) == Path(path).read_bytes(), path
    assert pickle.loads(pickle.dumps(members[3])) == members[3]


def test_shards_are_webdataset_tars_of_whole_samples(folder, shards):
    """Each image is ``<key>.<ext>`` then ``<key>.cls`` in the same tar (nothing split across shards), keys
    split by webdataset's rule (first "." of the base name) into the right key and extension."""
    index = json.loads((shards / "index.json").read_text())
    assert index["format"] == FORMAT and index["source"] == str(folder.resolve())
    assert sorted(p.name for p in shards.iterdir()) == sorted(index["shards"] + ["index.json"])
    keys, cls_texts, exts = [], [], []
    for shard_idx, name in enumerate(index["shards"]):
        with tarfile.open(shards / name) as tar:
            tar_members = tar.getmembers()
            assert len(tar_members) % 2 == 0, f"{name} ends inside a sample"
            for image, cls in zip(tar_members[::2], tar_members[1::2]):
                key, ext = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", image.name).groups()  # webdataset's split
                assert cls.name == f"{key}.cls"
                assert (image.mtime, image.mode, image.uid, image.gid) == (0, 0o444, 0, 0)
                keys.append(key)
                exts.append(ext)
                cls_texts.append(tar.extractfile(cls).read().decode("ascii"))
                row = index["samples"][len(keys) - 1]
                assert row[:3] == [shard_idx, image.offset_data, image.size], "index offset differs from tarfile's"
            # members fill at most shard_bytes (the file adds tar's end blocks), unless one sample is larger
            assert tar.offset <= SHARD_BYTES or len(tar_members) == 2, f"{name} is over shard_bytes"
    assert cls_texts == [str(row[3]) for row in index["samples"]]
    assert keys[:3] == ["cat/cat_0", "cat/cat_1", "cat/cat_2"]
    assert "dog/dog_v2_final" in keys and "dog/dog_v2_final~1" in keys  # dotted stem: no "." left, no collision
    assert len(set(keys)) == len(keys)
    assert exts.count("jpeg") == 3 and exts.count("png") == 1 and set(exts) == {"jpg", "jpeg", "png"}


def test_same_images_give_byte_identical_shards(folder, shards, tmp_path):
    again = write_shards(folder, tmp_path / "again", shard_bytes=SHARD_BYTES, progress=False).index.parent
    names = sorted(p.name for p in shards.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (shards / name).read_bytes() == (again / name).read_bytes(), name


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_populated_output_folder_is_refused_unless_overwrite(folder, shards, tmp_path):
    before = _contents(shards)
    with pytest.raises(FileExistsError, match=r"already holds the shards of .*images.*pass --overwrite"):
        write_shards(folder, shards, shard_bytes=1 << 20, progress=False)
    assert _contents(shards) == before  # nothing written, nothing removed
    write_shards(folder, shards, shard_bytes=1 << 20, overwrite=True, progress=False)  # rewritten, fewer shards
    assert sorted(p.name for p in shards.iterdir()) == ["index.json", "shard-000000.tar"]
    assert len(load_index(shards)[0]) == 12
    other = make_folder(tmp_path / "other")
    write_shards(other, shards, overwrite=True, progress=False)  # asked for: another source's shards replaced
    assert json.loads((shards / "index.json").read_text())["source"] == str(other.resolve())
    # files that are no shard set of ours: refused even with overwrite (a wrong folder, or data of someone else)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"mixed holds files that are not shards of ours \(notes.txt\)"):
            write_shards(folder, mixed, overwrite=overwrite, progress=False)
    assert _contents(mixed) == {"notes.txt": b"keep me"}
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        write_shards(folder, mixed / "notes.txt", progress=False)
    (tmp_path / "empty").mkdir()
    write_shards(folder, tmp_path / "empty", progress=False)  # an existing empty folder is fine


def test_unreadable_images_are_skipped_counted_and_listed(folder, tmp_path):
    """Empty files and truncated JPEGs (a real photo cut mid-scan) are left out and listed in the index with
    the reason; a JPEG with bytes after its end marker and a PNG named .jpg are valid images and kept."""
    import io

    import skimage.data

    encoded = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(encoded, "JPEG", quality=90)
    photo = encoded.getvalue()
    (folder / "cat" / "empty.jpg").write_bytes(b"")
    (folder / "cat" / "truncated.jpg").write_bytes(photo[:len(photo) // 2])
    (folder / "cat" / "not_an_image.jpg").write_bytes(b"<html>404</html>")
    (folder / "cat" / "trailing.jpg").write_bytes(photo + b"\0" * 100)
    Image.open(folder / "eel" / "eel_map.png").save(folder / "eel" / "png_inside.jpg", "PNG")
    written = write_shards(folder, tmp_path / "shards", progress=False)
    assert written.samples == 12 + 2
    assert sorted(written.skipped) == ["cat/empty.jpg", "cat/not_an_image.jpg", "cat/truncated.jpg"]
    assert written.skipped["cat/empty.jpg"] == "empty file (0 bytes)"
    assert "truncated JPEG" in written.skipped["cat/truncated.jpg"]
    index = json.loads(written.index.read_text())
    assert index["skipped"] == written.skipped
    members, labels, classes = load_index(written.index.parent)
    assert len(members) == 14
    for member in members:  # every packed image decodes
        Image.open(io.BytesIO(read_member(member))).convert("RGB")


def test_truncated_or_missing_shard_is_named(shards):
    members, _, _ = load_index(shards)
    last = Path(members[-1].shard)
    data = last.read_bytes()
    last.write_bytes(data[:members[-1].offset + members[-1].size - 1])
    with pytest.raises(ShardError, match=re.escape(str(last)) + ".*truncated"):
        load_index(shards)
    with pytest.raises(OSError, match=re.escape(str(last)) + ".*offset"):
        read_member(members[-1])
    last.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(last)) + ".*missing"):
        load_index(shards)


def test_read_member_refuses_a_short_read(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"0123456789")
    assert read_member(ShardMember(str(path), 2, 5)) == b"23456"
    with pytest.raises(OSError, match=f"{re.escape(str(path))}: short read at offset 8"):
        read_member(ShardMember(str(path), 8, 5))


def test_bad_or_missing_index_is_a_clear_error(shards, tmp_path):
    assert is_shard_dir(shards)
    assert not is_shard_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shard index"):
        load_index(tmp_path)
    index = shards / "index.json"
    good = json.loads(index.read_text())
    for text, error in [("{not json", "unreadable"), (json.dumps({**good, "format": "other/1"}), "not a shard index"),
                        (json.dumps({**good, "samples": [[0, 0, 10, 7]]}), "sample 0"),
                        (json.dumps({**good, "samples": [[0, 0, 10, 0], [0, 1.5, 10, 0]]}), "sample 1 is"),
                        (json.dumps({**good, "samples": [[0, 0, 10, 0], [0, 0, 10]]}), "sample 1 is"),
                        (json.dumps({**good, "shards": ["../x.tar"]}), "shard file names")]:
        index.write_text(text)
        with pytest.raises(ShardError, match=error):
            load_index(shards)
    index.write_text(json.dumps({"classes": good["classes"], "format": FORMAT}))  # format not first
    assert is_shard_dir(shards)
    index.write_text("[]")
    assert not is_shard_dir(shards)


def test_tool_writes_and_reports(folder, tmp_path):
    """The README's command: ``python tools/make_shards.py /imagenet/train /shards/in1k-train --shard-size-mb N``."""
    from test_readme_commands import run

    from rcmae.tools import make_shards

    out = tmp_path / "tool"
    printed = run("tools/make_shards.py", folder, out, "--shard-size-mb", SHARD_BYTES / 2**20).stdout
    members, _, _ = load_index(out)
    shards = len({m.shard for m in members})
    assert shards > 2 and f"wrote {shards} shards, 12 samples of 3 classes" in printed
    assert "skipped" not in printed
    other = make_folder(tmp_path / "other")
    with pytest.raises(SystemExit, match="already holds the shards.*pass --overwrite"):
        make_shards.main([str(other), str(out)])
    for k in range(7):
        (other / "cat" / f"broken_{k}.jpg").write_bytes(b"")
    printed = run("tools/make_shards.py", other, out, "--overwrite").stdout
    assert "wrote 1 shards, 12 samples of 3 classes" in printed
    assert ("skipped 7 unreadable images: cat/broken_0.jpg (empty file (0 bytes)), cat/broken_1.jpg" in printed
            and "(7 in all)" in printed and "index.json under 'skipped'" in printed)


def test_tool_help_imports_no_torch():
    code = ("import sys\nfrom rcmae.tools import make_shards\ntry:\n    make_shards.main(['--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\nprint('heavy:', 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and res.stdout.strip().endswith("heavy: False")


def test_interrupted_rewrite_leaves_no_index(folder, shards, monkeypatch):
    """A rewrite drops the old index before touching shards: a crash mid-way leaves no index that points at a
    mix of old and new shards."""
    import rcmae.core.data.shard_writer as shards_module

    calls, member_info = [], shards_module._member_info

    def failing_info(name, size):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return member_info(name, size)

    monkeypatch.setattr(shards_module, "_member_info", failing_info)
    with pytest.raises(OSError, match="disk full"):
        write_shards(folder, shards, shard_bytes=SHARD_BYTES, overwrite=True, progress=False)
    assert not (shards / "index.json").exists() and not is_shard_dir(shards)
    with pytest.raises(FileNotFoundError, match="no shard index"):
        load_index(shards)
