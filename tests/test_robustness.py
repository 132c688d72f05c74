import os
import socket
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torch.multiprocessing as mp
from PIL import Image

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.data.wnids import imagenet_wnids
from rcmae.core.vit import build_classifier
from rcmae.pretrain.models import build_mae
from rcmae.robustness.data import class_mask
from rcmae.robustness.defaults import DEFAULTS
from rcmae.robustness.evaluate import main
from rcmae.robustness.metrics import ALEXNET_CLEAN_ERR, ALEXNET_ERR, ALEXNET_ERR_EXTRA, SEVERITIES, corruption_errors
from rcmae.robustness.models import load_classifier

INFO = Path(timm.data.__file__).parent / "_info"


def alexnet_table(scale=1.0):
    return {c: {s: scale * e for s in SEVERITIES} for c, e in ALEXNET_ERR.items()}


def test_a_model_with_alexnets_errors_scores_100():
    out = corruption_errors(alexnet_table(), clean_error=ALEXNET_CLEAN_ERR)
    assert out["mCE"] == pytest.approx(100.0) and out["mCE_status"] == "complete"
    assert all(v == pytest.approx(100.0) for v in out["CE"].values())
    assert out["relative_mCE"] == pytest.approx(100.0)
    assert out["mean_error"] == pytest.approx(100 * sum(ALEXNET_ERR.values()) / 15)


def test_ce_and_mce_by_hand():
    errors = alexnet_table(0.5)
    errors["fog"] = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}  # sum 1.5 over 5 x 0.819324
    errors["saturate"] = {s: 0.9 for s in SEVERITIES}  # held out: never in mCE
    out = corruption_errors(errors, clean_error=0.2)
    fog_ce = 1.5 / (5 * 0.819324)
    assert out["CE"]["fog"] == pytest.approx(100 * fog_ce)
    assert out["mCE"] == pytest.approx(100 * (14 * 0.5 + fog_ce) / 15)
    assert out["relative_CE"]["fog"] == pytest.approx(100 * (1.5 - 5 * 0.2) / (5 * (0.819324 - ALEXNET_CLEAN_ERR)))
    assert out["extra_mean_error"] == {"saturate": pytest.approx(90.0)}
    assert "saturate" not in out["CE"]
    # the extras get their CE against AlexNet's published errors (hendrycks/robustness), apart from mCE
    assert out["extra_CE"] == {"saturate": pytest.approx(100 * 0.9 / 0.658248)}
    assert out["extra_mCE"] is None and out["extra_mCE_status"] == (
        "incomplete: missing speckle_noise, gaussian_blur, spatter")
    extras = {c: {s: e for s in SEVERITIES} for c, e in ALEXNET_ERR_EXTRA.items()}
    assert corruption_errors({**errors, **extras})["extra_mCE"] == pytest.approx(100.0)


def test_incomplete_imagenet_c_is_reported_not_averaged():
    errors = alexnet_table()
    del errors["fog"][5]
    del errors["snow"]
    out = corruption_errors(errors, clean_error=0.3)
    assert out["mCE"] is None and out["relative_mCE"] is None
    assert out["mCE_status"] == "incomplete: missing snow, fog (severities [5])"
    assert len(out["CE"]) == 13  # the complete corruptions still get their CE


@pytest.mark.parametrize("subset", ["imagenet_a", "imagenet_r"])
def test_subset_masks_match_timms_lists(tmp_path, subset):
    for wnid in imagenet_wnids(f"{subset}_synsets.txt"):
        (tmp_path / wnid).mkdir()
    mask = class_mask(tmp_path, subset)
    expected = sorted(int(i) for i in (INFO / f"{subset}_indices.txt").read_text().split())
    assert mask.sum() == 200 and mask.nonzero().flatten().tolist() == expected


def test_subset_folder_gives_its_own_mask(tmp_path):
    wnids = ["n01498041", "n02123394", "n03196217"]  # IN-A classes
    for w in wnids:
        (tmp_path / w).mkdir()
    mask = class_mask(tmp_path, "imagenet_a")
    index = imagenet_wnids()
    assert mask.nonzero().flatten().tolist() == sorted(index.index(w) for w in wnids)
    (tmp_path / "n02123045").mkdir()  # tabby: not an ImageNet-A class
    with pytest.raises(ValueError, match=r"\['n02123045'\] are not imagenet-a classes"):
        class_mask(tmp_path, "imagenet_a")


def _classifier_file(tmp_path, pool="avg", fmt="ours"):
    torch.manual_seed(0)
    model = build_classifier("vit_micro_patch8", 32, 1000, pool).eval()
    path = tmp_path / f"{fmt}_{pool}.pth"
    sd = model.state_dict()
    if fmt == "ours":
        torch.save({"format": ck.CLASSIFIER_FORMAT, "model": sd, "arch": "vit_micro_patch8", "img_size": 32,
                    "global_pool": pool, "num_classes": 1000}, path)
    elif fmt == "mae":
        torch.save({"model": sd, "epoch": 99}, path)
    else:
        torch.save(sd, path)
    return path, model


@pytest.mark.parametrize("fmt,pool", [("ours", "avg"), ("mae", "avg"), ("timm", "token")])
def test_checkpoint_readers(tmp_path, fmt, pool):
    path, ref = _classifier_file(tmp_path, pool, fmt)
    clf = load_classifier(str(path), "vit_micro_patch8", 32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clf.model.eval()(x), ref(x))
    assert f"{pool} pooling" in clf.description and clf.img_size == 32
    assert clf.preprocessing.startswith("MAE's evaluation") and clf.data_config["mean"] == (0.485, 0.456, 0.406)


def test_mae_checkpoint_tells_its_architecture_and_size(tmp_path):
    """An official MAE fine-tuned file names no architecture: it is read off the tensor shapes."""
    path, ref = _classifier_file(tmp_path, "avg", "mae")
    clf = load_classifier(str(path), None, None)
    assert "vit_micro_patch8" in clf.description and clf.img_size == 32
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clf.model.eval()(x), ref(x))


def test_mae_weights_keep_maes_preprocessing_under_a_timm_name(tmp_path):
    """An MAE fine-tuned file read by timm's model name is still evaluated with MAE's preprocessing (not
    vit_tiny_patch16_224's default tag: mean / std 0.5, crop 0.9); a timm state dict gets timm's."""
    torch.manual_seed(0)
    model = build_classifier("vit_tiny_patch16", 224, 1000, "avg")
    torch.save({"model": model.state_dict()}, tmp_path / "mae_finetuned.pth")
    clf = load_classifier(str(tmp_path / "mae_finetuned.pth"), "vit_tiny_patch16_224", None)
    assert clf.data_config["mean"] == (0.485, 0.456, 0.406) and clf.data_config["crop_pct"] == 0.875
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    clf = load_classifier(str(tmp_path / "timm.pth"), "vit_tiny_patch16_224", None)
    assert tuple(clf.data_config["mean"]) == (0.5, 0.5, 0.5) and clf.preprocessing.startswith("timm's data config")


def test_reader_rejects_non_classifiers(tmp_path):
    torch.save({"format": ck.FORMAT, "student": build_mae("vit_micro_patch8", 32, 32, 1, 2).state_dict(),
                "teacher": None}, tmp_path / "pre.pth")
    with pytest.raises(ck.CheckpointError, match="pretraining checkpoint .* has no classifier"):
        load_classifier(str(tmp_path / "pre.pth"), "vit_micro_patch8", 32)
    ten = build_classifier("vit_micro_patch8", 32, 10, "avg")
    torch.save({"model": ten.state_dict()}, tmp_path / "ten.pth")
    # any class count loads (rcmae.load_model shares this reader); the benchmarks refuse it themselves
    assert load_classifier(str(tmp_path / "ten.pth"), "vit_micro_patch8", 32).model.num_classes == 10
    path, _ = _classifier_file(tmp_path, "avg", "mae")
    with pytest.raises(ck.CheckpointError, match="as model 'vit_mini_patch8' does not fit"):
        load_classifier(str(path), "vit_mini_patch8", 32)


def _photo_folder(root, wnids, per_class, size=(60, 40)):
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / w / f"{i}.JPEG")
    return root


def _robustness_cfg(tmp_path, out):
    """The checkpoint is written once by the test: the workers load it before they join the process group."""
    path = tmp_path / "ours_avg.pth"
    return load_config(DEFAULTS, None, [f"model.checkpoint={path}", "model.img_size=32", "train.device=cpu",
                                        f"data.imagenet_a={tmp_path / 'a'}", "data.batch_size=2",
                                        "data.num_workers=0", f"train.output_dir={tmp_path / out}"])


def _worker(rank, port, tmp_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(_robustness_cfg(tmp_path, "ddp"))


def test_exact_counting_with_two_processes_and_an_uneven_split(tmp_path):
    import json

    _photo_folder(tmp_path / "a", ["n01498041", "n02123394"], per_class=4)
    (tmp_path / "a" / "n02123394" / "3.JPEG").unlink()  # 7 images: 4 + 3 over two processes
    _classifier_file(tmp_path)
    single = main(_robustness_cfg(tmp_path, "single"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, tmp_path), nprocs=2, join=True)
    one = json.loads(Path(single["results"]).read_text())["imagenet_a"]
    two = json.loads((tmp_path / "ddp" / "robustness.json").read_text())["imagenet_a"]
    assert one["n"] == two["n"] == 7 and one["classes"] == 2
    assert (one["correct1"], one["correct5"]) == (two["correct1"], two["correct5"])
    assert two["correct5"] == 7  # restricted to 2 classes, both are in the top 5
