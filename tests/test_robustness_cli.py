"""tools/eval_robustness.py as the README runs it, on miniature benchmark trees laid out like the real
ones (ImageNet val and Sketch: <wnid>/; ImageNet-C: <corruption>/<severity>/<wnid>/, 224 x 224 JPEGs;
ImageNet-A: <wnid>/ of its 200 classes), with classifiers of every advertised origin."""
import json

import numpy as np
import pytest
import timm
import timm.data
import torch
from fixtures import make_benchmarks, run_in_process
from PIL import Image

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.data.wnids import imagenet_wnids
from rcmae.core.errors import ConfigError
from rcmae.core.vit import build_classifier
from rcmae.robustness.defaults import DEFAULTS
from rcmae.robustness.evaluate import RESULTS, main
from rcmae.tools import eval_robustness as eval_robustness_tool

IN_A = ["n01498041", "n02123394"]  # stingray, Persian cat: ImageNet-A classes


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory, imagenet):
    return make_benchmarks(tmp_path_factory.mktemp("benchmarks"), imagenet)


def ours_classifier(path, img_size=32, num_classes=1000):
    torch.manual_seed(0)
    model = build_classifier("vit_micro_patch8", img_size, num_classes, "avg").eval()
    torch.save({"format": ck.CLASSIFIER_FORMAT, "model": model.state_dict(), "arch": "vit_micro_patch8",
                "img_size": img_size, "global_pool": "avg", "num_classes": num_classes}, path)
    return path


def run_tool(*args):
    """``python tools/eval_robustness.py ARGS`` in this process (fixtures.run_in_process: status, stdout and
    stderr as a shell would see them; an unexpected exception, where the command prints a traceback, fails
    the test)."""
    return run_in_process(eval_robustness_tool, *args)


def cfg(out, *overrides):
    return load_config(DEFAULTS, None, [f"train.output_dir={out}", "train.device=cpu", "data.num_workers=0",
                                        "data.batch_size=4", *overrides])


def test_readme_command_takes_the_model_from_the_checkpoint(tmp_path, benchmarks):
    """The README's shape: no --model, no size; ImageNet-C is evaluated as stored unless asked, so a
    32-px classifier is refused before any image with the flag that fixes it."""
    ckpt = ours_classifier(tmp_path / "classifier_best.pth")
    args = ["--checkpoint", ckpt, "--imagenet-val", benchmarks / "val", "--imagenet-c", benchmarks / "c",
            "--imagenet-a", benchmarks / "a", "--imagenet-sketch", benchmarks / "sketch", "--workers", "0",
            "--output", tmp_path / "out"]
    res = run_tool(*args)
    assert res.returncode != 0 and "pass --imagenet-c-resize" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / RESULTS).exists()
    res = run_tool(*args, "--imagenet-c-resize")
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert "vit_micro_patch8" in r["model"] and r["settings"]["data_config"]["input_size"] == [3, 32, 32]
    assert r["settings"]["imagenet_c"] == "val preprocessing"
    assert r["imagenet_val"]["n"] == 16 and r["imagenet_val"]["classes"] == 4
    assert r["imagenet_a"]["n"] == 4 and r["imagenet_a"]["classes"] == 2
    assert r["problems"] == {"imagenet_c/snow/3": r["problems"]["imagenet_c/snow/3"]}
    assert r["problems"]["imagenet_c/snow/3"].startswith("empty")
    c = r["imagenet_c"]
    # the mCE column rests on the benchmark corruptions only: fog, 2 cells x 8 images (saturate is extra)
    assert c["images"] == 2 * 8 and c["mCE"] is None and c["extra_mCE"] is None
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "imagenet_c/snow/3: empty" in summary and "| fog | " in summary and "incomplete" in summary
    assert "| images | 16 | 4 | - | 16 | 16 |" in summary and "| classes | 4 | 2 | - | 4 | 4 |" in summary
    assert "Table 13" in summary and "(extra)" in summary


def test_paths_and_layouts_are_checked_before_the_first_image(tmp_path, benchmarks):
    ckpt = ours_classifier(tmp_path / "c.pth")
    res = run_tool("--checkpoint", ckpt, "--imagenet-val", benchmarks / "val", "--imagenet-c", benchmarks / "c",
                   "--imagenet-a", benchmarks / "a", "--imagenet-r", benchmarks / "a",  # A is not R
                   "--imagenet-sketch", benchmarks / "sketch", "--imagenet-c-resize", "--output", tmp_path / "o1")
    assert res.returncode != 0 and "not imagenet-r classes" in res.stderr
    res = run_tool("--checkpoint", ckpt, "--imagenet-val", benchmarks / "val", "--imagenet-c", benchmarks / "c",
                   "--imagenet-sketch", benchmarks / "sketchh", "--imagenet-c-resize", "--output", tmp_path / "o2")
    assert res.returncode != 0 and f"data.imagenet_sketch: image folder {benchmarks / 'sketchh'} does not exist" \
        in res.stderr and "Traceback" not in res.stderr
    for out in ("o1", "o2"):
        assert not (tmp_path / out / RESULTS).exists()  # nothing was evaluated
    res = run_tool("--checkpoint", ckpt, "--imagenet-val", benchmarks / "val", "--demo")
    assert res.returncode != 0 and "the demo builds its own benchmark trees" in res.stderr


def test_a_rerun_skips_what_is_done(tmp_path, benchmarks, caplog):
    ckpt = ours_classifier(tmp_path / "c.pth", img_size=224)
    out = tmp_path / "out"
    first = main(cfg(out, f"model.checkpoint={ckpt}", f"data.imagenet_c={benchmarks / 'c'}"))
    lines = (out / RESULTS).read_text().splitlines()
    # in benchmark order (snow before fog), then the extras: 4 cells + the empty one
    assert [json.loads(x)["key"] for x in lines] == ["imagenet_c/snow/3", "imagenet_c/fog/1", "imagenet_c/fog/2",
                                                    "imagenet_c/saturate/1", "imagenet_c/saturate/2"]
    result = (out / "robustness.json").read_text()
    # an interrupted run: the last two cells never finished
    (out / RESULTS).write_text("\n".join(lines[:-2]) + "\n")
    main(cfg(out, f"model.checkpoint={ckpt}", f"data.imagenet_c={benchmarks / 'c'}"))
    again = (out / RESULTS).read_text().splitlines()
    assert again[:-2] == lines[:-2] and len(again) == 5  # only the two missing cells were evaluated
    def scores(text):  # the timing of a cell is not a result
        c = json.loads(text)["imagenet_c"]
        return {**c, "cells": {k: {f: v for f, v in cell.items() if f != "img_per_s"} for k, cell in c["cells"].items()}}

    assert scores((out / "robustness.json").read_text()) == scores(result)
    with pytest.raises(ConfigError, match="holds results of another evaluation"):
        main(cfg(out, f"model.checkpoint={ckpt}", f"data.imagenet_c={benchmarks / 'c'}", "model.preprocessing=timm"))
    main(cfg(out, f"model.checkpoint={ckpt}", f"data.imagenet_c={benchmarks / 'c'}", "train.resume=none"))
    assert len((out / RESULTS).read_text().splitlines()) == 5
    assert first["output_dir"] == str(out)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_any_timm_classifier_with_its_own_preprocessing(tmp_path, benchmarks, name):
    """A timm state dict by model name, with timm's data config of that model; its top-1 equals a direct
    forward pass over the same images (ImageNet-C as stored: normalisation only)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    main(cfg(tmp_path / "out", f"model.checkpoint={tmp_path / f'{name}.pth'}", f"model.arch={name}",
             f"data.imagenet_c={benchmarks / 'c'}"))
    r = json.loads((tmp_path / "out" / "robustness.json").read_text())
    data = timm.data.resolve_data_config({}, model=model)
    assert r["settings"]["preprocessing"] == f"timm's data config of {name}"
    assert r["settings"]["data_config"]["mean"] == list(data["mean"])
    mean, std = torch.tensor(data["mean"])[:, None, None], torch.tensor(data["std"])[:, None, None]
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    correct = 0
    with torch.no_grad():
        for path in sorted((benchmarks / "c" / "fog" / "1").glob("*/*.JPEG")):
            x = (torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 255 - mean) / std
            correct += int(model(x[None]).argmax(1).item() == index[path.parent.name])
    assert r["imagenet_c"]["cells"]["fog/1"]["correct1"] == correct
    assert r["imagenet_c"]["cells"]["fog/1"]["n"] == 8


def test_models_the_benchmarks_cannot_take_are_refused_before_the_run_starts(tmp_path, benchmarks):
    """Each refusal names the flag and what was expected, and comes before the output folder is made."""
    ckpt = ours_classifier(tmp_path / "c.pth")
    val = f"data.imagenet_val={benchmarks / 'val'}"
    refused = [
        # our checkpoint names its architecture: a different --model would be ignored
        ([f"model.checkpoint={ckpt}", "model.arch=resnet18"], ConfigError,
         r"model.arch \(--model\)='resnet18'.*names its architecture itself \(vit_micro_patch8, 32 px\)"),
        ([f"model.checkpoint={ckpt}", "model.img_size=224"], ConfigError, r"model.img_size \(--img-size\)=224"),
        # timm's data config of a ViT says 224 px; this one takes 32 px
        ([f"model.checkpoint={ckpt}", "model.preprocessing=timm"], ConfigError,
         r"makes 224-px inputs.*takes 32 px.*--preprocessing mae"),
        ([f"model.checkpoint={ours_classifier(tmp_path / 'ten.pth', num_classes=10)}"], ck.CheckpointError,
         r"10-way head; the benchmarks need the 1000 ImageNet-1k classes"),
    ]
    for overrides, error, message in refused:
        out = tmp_path / "out"
        with pytest.raises(error, match=message):
            main(cfg(out, val, *overrides))
        assert not out.exists(), overrides
    res = run_tool("--checkpoint", ckpt, "--model", "resnet1", "--imagenet-val", benchmarks / "val",
                   "--output", tmp_path / "out")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "model.arch (--model): unknown timm model 'resnet1'" in res.stderr and "resnet18" in res.stderr
    assert not (tmp_path / "out").exists()
