"""The linear-probe grid (finetune/probe_grid.py): the documented features, each head trained exactly as its own
run, the head chosen on held-out training images (never val), exact resume, and the checks before any work."""
import json
import subprocess
import sys

import pytest
import torch

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.errors import ConfigError
from rcmae.core.vit import build_classifier
from rcmae.finetune.defaults import LINPROBE_DEFAULTS
from rcmae.finetune.probe_grid import HeadSpec, ProbeGrid, feature_parts
from rcmae.finetune.train import main


def grid_overrides(imagenet, out, *overrides) -> list[str]:
    return ["model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={imagenet / 'train'}",
            f"data.val_path={imagenet / 'val'}", "data.num_workers=0", "optim.batch_size=6", "optim.epochs=2",
            "optim.warmup_epochs=1", "train.micro_batch=6", "train.device=cpu", f"train.output_dir={out}",
            "eval.batch_size=8", "log.every_steps=1", "grid.held_out_fraction=0.25", *overrides]


def grid_cfg(imagenet, out, *overrides):
    return load_config(LINPROBE_DEFAULTS, None, grid_overrides(imagenet, out, *overrides))


def heads_of(path) -> dict:
    """Each head's state (its BatchNorm statistics and Linear) in a grid checkpoint, by the head's name."""
    state = torch.load(path, weights_only=True)
    return {name: {k.split(".", 2)[2]: v for k, v in state["train_model"].items() if k.startswith(f"heads.{i}.")}
            for i, name in enumerate(state["heads"])}


def test_features_are_the_documented_tokens():
    """cls: timm's token-pool pre-logits (MAE's probe input); avgpool: the mean of the final-normed patch tokens;
    cls_last2: the final-normed class tokens of the last two blocks, oldest first; joined kinds concatenate."""
    torch.manual_seed(0)
    vit = build_classifier("vit_micro_patch8", 32, 0, "token").eval()
    specs = [HeadSpec(0.1, f) for f in ("cls", "avgpool", "cls_last2", "cls_last2+avgpool")]
    grid = ProbeGrid(vit, specs, 5, seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in vit.blocks]
    tokens = vit.forward_features(x)
    for h in hooks:
        h.remove()
    feats = grid.features(x)
    torch.testing.assert_close(feats["cls"], vit.forward_head(tokens, pre_logits=True))
    torch.testing.assert_close(feats["avgpool"], tokens[:, 1:].mean(1))
    last2 = torch.cat([vit.norm(outputs[0])[:, 0], vit.norm(outputs[1])[:, 0]], dim=1)
    torch.testing.assert_close(feats["cls_last2"], last2)
    torch.testing.assert_close(feats["cls_last2+avgpool"], torch.cat([last2, tokens[:, 1:].mean(1)], dim=1))
    assert grid(x).shape == (4, 3, 5)
    assert [h[1].in_features for h in grid.heads] == [32, 32, 64, 96]
    assert not any(p.requires_grad for p in grid.backbone.parameters())


def test_feature_kinds_are_checked():
    assert feature_parts("cls_last4+avgpool", 12) == [("cls", 4), ("avgpool", 1)]
    for bad, message in (("cls_last3", "last 3 blocks of a 2-block"), ("mean", "not a feature kind"),
                         ("cls_last0", "not a feature kind")):
        with pytest.raises(ConfigError, match=message):
            feature_parts(bad, 2)


def test_each_head_trains_as_its_own_run_and_held_out_images_choose(tmp_path, imagenet):
    """A grid of 2 learning rates x 2 feature kinds ends with each head's weights and BatchNorm statistics equal to
    a one-head run's of the same setting; the chosen head is the best on the held-out images (one per class,
    never trained on), whatever val says."""
    grid = main(grid_cfg(imagenet, tmp_path / "grid", "grid.base_lrs=[0.05,2.0]", "grid.features=[cls,avgpool]"))
    together = heads_of(grid["checkpoint"])
    assert list(together) == ["cls@0.05", "cls@2", "avgpool@0.05", "avgpool@2"]
    for name in together:
        feature, lr = name.split("@")
        alone = main(grid_cfg(imagenet, tmp_path / name, f"grid.base_lrs=[{lr}]", f"grid.features=[{feature}]"))
        (single,) = heads_of(alone["checkpoint"]).values()
        for key, value in single.items():
            torch.testing.assert_close(together[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    assert not torch.equal(together["cls@0.05"]["1.weight"], together["cls@2"]["1.weight"])  # the lrs differ
    groups = torch.load(grid["checkpoint"], weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == pytest.approx([0.5, 20, 0.5, 20])  # head lr / optim.base_lr (0.1)
    table = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert (table["train_images"], table["held_out_images"], table["val_images"]) == (12, 4, 16)
    best = max(table["heads"], key=lambda h: (h["held_out_top1"], h["held_out_top5"]))
    assert table["chosen"] == best["name"] == grid["best"]["head"]
    assert grid["best"]["top1"] == best["top1"]  # the chosen head's val top-1, reported, not chosen by
    probe = torch.load(tmp_path / "grid" / "probe_best.pth", weights_only=True)
    assert probe["head"] == table["chosen"] and probe["linear"]["weight"].shape[0] == 4  # folder classes
    evals = [json.loads(line) for line in (tmp_path / "grid" / "metrics.jsonl").read_text().splitlines()
             if "eval_top1" in line]
    assert evals[-1]["eval_head"] == table["chosen"] and evals[-1]["eval_top1"] == best["top1"]


def test_grid_resumes_exactly(tmp_path, imagenet):
    heads = ["grid.base_lrs=[0.1,1.0]", "grid.features=[cls,cls_last2]"]
    straight = main(grid_cfg(imagenet, tmp_path / "straight", *heads))
    main(grid_cfg(imagenet, tmp_path / "split", *heads, "train.stop_at_step=3"))
    resumed = main(grid_cfg(imagenet, tmp_path / "split", *heads))
    assert straight["step"] == resumed["step"] == 4
    a, b = (torch.load(r["checkpoint"], weights_only=True) for r in (straight, resumed))
    for k in a["train_model"]:
        assert torch.equal(a["train_model"][k], b["train_model"][k]), k
    assert a["best"] == b["best"]
    assert (tmp_path / "straight" / "grid.json").read_text() == (tmp_path / "split" / "grid.json").read_text()
    with pytest.raises(ck.CheckpointError, match="probe-grid"):  # a single head cannot resume a grid's run
        main(grid_cfg(imagenet, tmp_path / "split", "optim.epochs=3"))


@pytest.mark.parametrize("overrides, message", [
    (["train.mode=finetune", "optim.name=adamw"], "trains linear probes with LARS"),
    (["grid.held_out_fraction=1.0"], "held_out_fraction must be in"),
    (["grid.features=[cls_last3]"], "last 3 blocks of a 2-block"),
    (["grid.base_lrs=[0.1,0.1]"], "appear twice"),
    (["grid.base_lrs=[-1]"], "not a positive learning rate"),
])
def test_bad_grids_are_refused_before_any_work(tmp_path, imagenet, overrides, message):
    with pytest.raises(ConfigError, match=message):
        main(grid_cfg(imagenet, tmp_path / "out", "grid.features=[cls]", *overrides))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_grid_on_two_gloo_processes_counts_every_image_once(tmp_path, imagenet):
    """torchrun, 2 processes: each head's held-out and val accuracies rest on every image exactly once."""
    out = tmp_path / "ddp"
    overrides = grid_overrides(imagenet, out, "grid.base_lrs=[0.1,1.0]", "grid.features=[cls,avgpool]",
                               "train.micro_batch=3")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "rcmae.tools.linprobe", *overrides], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (start,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert start["world_size"] == 2
    table = json.loads((out / "grid.json").read_text())
    assert len(table["heads"]) == 4 and all((h["n"], h["held_out_n"]) == (16, 4) for h in table["heads"])
