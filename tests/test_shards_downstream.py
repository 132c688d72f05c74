"""Every job reads shards: fine-tuning, linear probing, k-NN and the robustness suite's clean val (and -A / -R /
-Sketch) give the same numbers on a shard folder as on the ImageFolder tree it was written from."""
import json

import pytest
import torch
from fixtures import make_imagenet

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.data.readers import labelled_images
from rcmae.core.data.shard_writer import write_shards
from rcmae.core.data.shards import ShardMember, read_member
from rcmae.core.vit import build_classifier
from rcmae.finetune import knn_tool
from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
from rcmae.finetune.defaults import KNN_TOOL_DEFAULTS
from rcmae.finetune.train import main as finetune
from rcmae.robustness.defaults import DEFAULTS as ROBUSTNESS_DEFAULTS
from rcmae.robustness.evaluate import main as evaluate_robustness


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The miniature ImageNet (train / val wnid folders of real photo crops) and a shard folder of each split,
    in shards of a few images so that samples span several files."""
    root = make_imagenet(tmp_path_factory.mktemp("imagenet"), per_class=6, size=40)
    for split in ("train", "val"):
        write_shards(root / split, root / f"{split}_shards", shard_bytes=8000, progress=False)
    return root


@pytest.mark.parametrize("label_space", ["folder", "imagenet1k"])
def test_shards_read_as_the_folder_they_were_written_from(trees, label_space):
    paths, labels, n = labelled_images(trees / "val", label_space, "val")
    members, shard_labels, shard_n = labelled_images(trees / "val_shards", label_space, "val")
    assert len({m.shard for m in members}) > 1 and all(isinstance(m, ShardMember) for m in members)
    assert (shard_labels, shard_n) == (labels, n) and n == (len(set(labels)) if label_space == "folder" else 1000)
    assert [read_member(m) for m in members] == [open(p, "rb").read() for p in paths]


def _finetune_cfg(trees, out, train, val, *extra):
    return load_config(FT_DEFAULTS, None, [
        "model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={trees / train}",
        f"data.val_path={trees / val}", "data.label_space=imagenet1k", "data.num_workers=0", "optim.batch_size=8",
        "optim.epochs=1", "optim.warmup_epochs=0", "train.micro_batch=8", "train.device=cpu",
        f"train.output_dir={out}", "eval.batch_size=8", "model.drop_path=0.1", *extra])


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_finetuning_and_probing_on_shards_match_the_folders(trees, tmp_path, mode):
    runs = {name: finetune(_finetune_cfg(trees, tmp_path / name, train, val, f"train.mode={mode}"))
            for name, train, val in (("folder", "train", "val"), ("shards", "train_shards", "val_shards"))}
    assert runs["shards"]["eval"] == runs["folder"]["eval"] and runs["folder"]["eval"]["n"] == 24
    weights = {name: torch.load(tmp_path / name / "classifier_best.pth", weights_only=False)["model"]
               for name in runs}
    assert all(torch.equal(weights["folder"][k], weights["shards"][k]) for k in weights["folder"])


def test_knn_on_shards_matches_the_folders(trees, tmp_path):
    torch.manual_seed(0)
    encoder = build_classifier("vit_micro_patch8", 32, 0, "token")
    torch.save({"model": encoder.state_dict()}, tmp_path / "encoder.pth")
    results = {}
    for name, suffix in (("folder", ""), ("shards", "_shards")):
        cfg = load_config(KNN_TOOL_DEFAULTS, None, [
            f"init.checkpoint={tmp_path / 'encoder.pth'}", "model.arch=vit_micro_patch8", "model.img_size=32",
            f"data.train_path={trees / ('train' + suffix)}", f"data.val_path={trees / ('val' + suffix)}",
            "data.label_space=imagenet1k", "data.num_workers=0", "train.device=cpu",
            f"train.output_dir={tmp_path / name}"])
        results[name] = knn_tool.main(cfg)
    assert results["folder"]["knn_n"] == 24
    assert {k: v for k, v in results["shards"].items() if k.startswith("knn_")} == \
        {k: v for k, v in results["folder"].items() if k.startswith("knn_")}


def test_robustness_clean_val_on_shards_matches_the_folder(trees, tmp_path):
    torch.manual_seed(0)
    model = build_classifier("vit_micro_patch8", 32, 1000, "avg")
    torch.save({"format": ck.CLASSIFIER_FORMAT, "model": model.state_dict(), "arch": "vit_micro_patch8",
                "img_size": 32, "global_pool": "avg", "num_classes": 1000}, tmp_path / "classifier.pth")
    results = {}
    for name, val in (("folder", "val"), ("shards", "val_shards")):
        cfg = load_config(ROBUSTNESS_DEFAULTS, None, [
            f"model.checkpoint={tmp_path / 'classifier.pth'}", "model.img_size=32", "train.device=cpu",
            f"data.imagenet_val={trees / val}", f"data.imagenet_sketch={trees / val}", "data.batch_size=8",
            "data.num_workers=0", f"train.output_dir={tmp_path / name}"])
        out = json.loads(open(evaluate_robustness(cfg)["results"]).read())
        results[name] = {k: {f: v for f, v in out[k].items() if f != "img_per_s"}
                         for k in ("imagenet_val", "imagenet_sketch")}
    assert results["folder"]["imagenet_val"]["n"] == 24
    assert results["shards"] == results["folder"]
