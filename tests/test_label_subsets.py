"""Label-efficient runs: class-balanced deterministic fractions, image lists by file name, the shipped SimCLR
ImageNet 1 % / 10 % lists (checked against upstream), and a fine-tuning run on a subset."""
import gzip
import hashlib
from collections import Counter
from pathlib import Path

import pytest
import timm

from rcmae.core.config import load_config
from rcmae.core.data.subsets import balanced_subset, check_subset_options, held_out_split, listed_subset
from rcmae.core.errors import ConfigError
from rcmae.finetune.defaults import DEFAULTS
from rcmae.finetune.train import main

ROOT = Path(__file__).resolve().parents[1]
# google-research/simclr imagenet_subsets/{1,10}percent.txt at 383d4143 (unchanged since be133b38): sha256 of the text
SIMCLR = {"imagenet_1percent": (12811, "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"),
          "imagenet_10percent": (128116, "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091")}


def test_balanced_subsets_are_per_class_nested_and_independent_of_other_classes():
    labels = [0] * 10 + [1] * 3 + [2] * 1
    half = balanced_subset(labels, 0.5, 0, "f")
    assert Counter(labels[i] for i in half) == {0: 5, 1: 2, 2: 1}  # 1.5 rounds up; every class keeps one
    assert Counter(labels[i] for i in balanced_subset(labels, 0.1, 0, "f")) == {0: 1, 1: 1, 2: 1}
    assert set(balanced_subset(labels, 0.2, 0, "f")) <= set(half)  # a smaller fraction lies inside a larger one
    assert balanced_subset(labels, 1.0, 0, "f") == list(range(14))
    assert balanced_subset(labels, 0.5, 1, "f") != half  # the seed chooses
    # class 0's choice does not depend on what other classes hold, nor where its images sit in the list
    alone = balanced_subset([0] * 10, 0.5, 0, "f")
    assert [i for i in half if labels[i] == 0] == alone
    shifted = balanced_subset([1] * 3 + [0] * 10, 0.5, 0, "f")
    assert [i - 3 for i in shifted if i >= 3] == alone
    assert half == [0, 2, 4, 6, 8, 10, 11, 13]  # sha256 ranks: the same on every machine and version
    with pytest.raises(ConfigError, match="must be in"):
        balanced_subset(labels, 0.0, 0, "data.label_fraction")


def test_image_lists_by_file_name(tmp_path):
    paths = [f"/data/train/n0{c}/n0{c}_{k}.JPEG" for c in (1, 2) for k in range(3)]
    listing = tmp_path / "list.txt"
    listing.write_text("n01_2.JPEG\nn02/n02_0.JPEG\n\n")
    assert listed_subset(paths, listing, "data.subset_file") == [2, 3]
    packed = tmp_path / "list.txt.gz"
    packed.write_bytes(gzip.compress(b"n02_1.JPEG\n"))
    assert listed_subset(paths, packed, "data.subset_file") == [4]
    listing.write_text("n01_2.JPEG\nn01_9.JPEG\n")
    with pytest.raises(ConfigError, match="1 of its 2 images are not in the training set"):
        listed_subset(paths, listing, "data.subset_file")
    listing.write_text("n01_2.JPEG\nn01_2.JPEG\n")
    with pytest.raises(ConfigError, match="twice"):
        listed_subset(paths, listing, "data.subset_file")


@pytest.mark.parametrize("name", sorted(SIMCLR))
def test_shipped_lists_are_simclrs(name):
    lines, digest = SIMCLR[name]
    text = gzip.decompress((ROOT / "configs" / "subsets" / f"{name}.txt.gz").read_bytes())
    assert hashlib.sha256(text).hexdigest() == digest
    names = text.decode().split()
    wnids = Counter(n.split("_")[0] for n in names)
    synsets = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(names) == len(set(names)) == lines and sorted(wnids) == sorted(synsets)
    per_class = lines // 1000
    assert set(wnids.values()) == {per_class, per_class + 1}  # about 1 % / 10 % of every class


def test_one_percent_lies_inside_ten_percent():
    one, ten = (set(gzip.decompress((ROOT / "configs" / "subsets" / f"{n}.txt.gz").read_bytes()).decode().split())
                for n in ("imagenet_1percent", "imagenet_10percent"))
    assert one < ten


def ft_cfg(imagenet, out, *overrides):
    base = ["model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={imagenet / 'train'}",
            f"data.val_path={imagenet / 'val'}", "data.num_workers=0", "optim.batch_size=4", "optim.epochs=1",
            "optim.warmup_epochs=0", "train.micro_batch=4", "train.device=cpu", f"train.output_dir={out}",
            "eval.batch_size=8", "aug.mixup=0", "aug.cutmix=0"]
    return load_config(DEFAULTS, None, base + list(overrides))


def test_finetuning_on_a_listed_subset_and_a_fraction(tmp_path, imagenet, capsys):
    """The run trains on the listed images (ImageNet's file names, found in their wnid folders) or the fraction."""
    listing = tmp_path / "two_per_class.txt"
    listing.write_text("".join(f"{p.name}\n" for p in sorted((imagenet / "train").glob("*/*_000[01].JPEG"))))
    out = main(ft_cfg(imagenet, tmp_path / "listed", f"data.subset_file={listing}"))
    assert out["step"] == 2 and "on 8 train / 16 val images" in capsys.readouterr().out  # batch 4
    out = main(ft_cfg(imagenet, tmp_path / "fraction", "data.label_fraction=0.25"))
    assert out["step"] == 1 and "4 of 16 training images, 4 classes" in capsys.readouterr().out


def test_subset_options_are_checked_before_any_work(tmp_path, imagenet):
    listing = tmp_path / "list.txt"
    listing.write_text("n02123045_0000.JPEG\nn02123045_9999.JPEG\n")
    train = str(imagenet / "train")
    for d, message in (({"label_fraction": 0.1, "subset_file": str(listing)}, "give one"),
                       ({"label_fraction": 1.5}, "must be in"),
                       ({"subset_file": str(tmp_path / "none.txt")}, "no such file"),
                       ({"subset_file": str(listing)}, "1 of its 2 images are not in")):
        with pytest.raises(ConfigError, match=message):
            check_subset_options({"source": "folder", "train_path": train, **d})
    with pytest.raises(ConfigError, match="1 of its 2 images are not in"):
        main(ft_cfg(imagenet, tmp_path / "out", f"data.subset_file={listing}"))
    assert not (tmp_path / "out").exists()


def test_held_out_split_keeps_an_image_of_every_class():
    labels = [0] * 8 + [1] * 4
    kept, held = held_out_split(labels, 0.25, 0, "grid.held_out_fraction")
    assert sorted(kept + held) == list(range(12)) and Counter(labels[i] for i in held) == {0: 2, 1: 1}
    with pytest.raises(ConfigError, match="holds out every training image of 1 class"):
        held_out_split([0] * 8 + [1], 0.25, 0, "grid.held_out_fraction")
