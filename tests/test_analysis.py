"""tools/analyze_teacher.py: the README's commands (shrunk by overrides) on the demo data and on a
miniature ImageNet, the probe of checkpoints of every pretraining origin, and the checks made first."""
import csv
import json

import pytest
import torch
from test_readme_commands import TINY_PRETRAIN, run_here

from rcmae.analysis.compare import read_metrics
from rcmae.analysis.defaults import DEFAULTS as ANALYSIS_DEFAULTS
from rcmae.analysis.mean_teacher import validate
from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
from rcmae.core.config import load_config
from rcmae.core.errors import ConfigError
from rcmae.tools import analyze_teacher as analyze_tool


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_demo_command_runs_every_section(tmp_path, monkeypatch):
    """``python tools/analyze_teacher.py``: the demo with fewer seeds and steps (its pretraining runs are
    processes of their own, with one thread each)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "demo"
    run_here(analyze_tool, "--demo", f"train.output_dir={out}", "compare.seeds=[0,1]",
             "compare.pretrain_overrides=[optim.epochs=1,log.every_steps=1,checkpoint.every_epochs=1,"
             "knn.every_epochs=1]", "compare.probe_every_steps=2", "compare.heldout_images=16", "probe.trials=2",
             "probe.batch_size=8")
    result = json.loads((out / "analysis.json").read_text())
    assert set(result) >= {"linear", "compare", "probe"}
    summary = result["compare"]["summary"]
    assert set(summary) == {"mae", "rcmae_same", "rcmae_different"} and summary["mae"]["seeds"] == 2
    assert "teacher_heldout_recon" not in summary["mae"] and "teacher_heldout_recon" in summary["rcmae_same"]
    for variant in summary.values():
        assert variant["heldout_recon"]["mean"] > 0 and variant["mem_gb"]["mean"] > 0 and variant["step_s"]["mean"] > 0
    # equal steps, identical data order and masks: the first step (teacher = student) is the same in every variant
    for seed in (0, 1):
        first = {v: next(r for r in lines(out / "runs" / f"{v}_seed{seed}" / "metrics.jsonl") if "recon" in r)
                 for v in summary}
        assert len({round(r["recon"], 6) for r in first.values()}) == 1, first
        assert first["rcmae_same"]["consistency"] == 0.0
    # the probe ran during the RC-MAE runs only, and on the first RC-MAE run's final checkpoint
    assert not any("probe_cos_r_c" in r for r in lines(out / "runs" / "mae_seed0" / "metrics.jsonl"))
    assert any("probe_cos_c_update" in r for r in lines(out / "runs" / "rcmae_different_seed1" / "metrics.jsonl"))
    assert result["probe"]["checkpoint"] == str(find_last_checkpoint(out / "runs" / "rcmae_same_seed0"))
    assert set(result["probe"]["experiment"]) == {"same_masks", "new_masks", "new_augmentation", "unrelated"}
    with open(out / "compare_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    for name in ("linear_closed_form.png", "linear_similarity.png", "compare_curves.png", "probe_curves.png",
                 "probe_experiment.png", "linear_similarity.csv", "compare_summary.csv", "compare_curves.csv",
                 "probe_experiment.csv", "probe_blocks.csv"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_imagenet_command_and_the_probe_of_every_checkpoint_origin(tmp_path, imagenet, monkeypatch):
    """``python tools/analyze_teacher.py data.train_path=... data.val_path=...`` (the ViT-B recipe,
    shrunk), then ``sections=[probe] probe.checkpoint=...`` on our, MAE's and RC-MAE's files."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "in1k"
    run_here(analyze_tool, f"data.train_path={imagenet / 'train'}", f"data.val_path={imagenet / 'val'}",
             f"train.output_dir={out}", "sections=[compare]", "compare.seeds=[0]",
             "compare.variants=[mae,rcmae_same]",
             "compare.pretrain_overrides=[" + ",".join([*TINY_PRETRAIN, "knn.every_epochs=1", "checkpoint.keep=0"])
             + "]")
    cfg = read_checkpoint(find_last_checkpoint(out / "runs" / "rcmae_same_seed0")).raw["config"]
    assert cfg["data"]["path"] == str(imagenet / "train") and cfg["knn"]["val_path"] == str(imagenet / "val")
    assert cfg["optim"]["base_lr"] == 1.5e-4  # the ViT-B recipe the default names
    result = json.loads((out / "analysis.json").read_text())["compare"]
    assert result["heldout"]["path"] == str(imagenet / "val")
    assert [s for s, _ in result["runs"][1]["curves"]["heldout_recon"]] == [2, 4]  # every kept checkpoint

    ours = read_checkpoint(find_last_checkpoint(out / "runs" / "rcmae_same_seed0"))
    torch.save({"model": ours.student, "epoch": 1}, tmp_path / "mae_full.pth")
    torch.save({"student": {f"module.{k}": v for k, v in ours.student.items()}, "teacher": ours.teacher,
                "epoch": 1}, tmp_path / "rcmae_official.pth")
    files = {"ours": ours.path, "mae": tmp_path / "mae_full.pth", "rcmae": tmp_path / "rcmae_official.pth"}
    for name, path in files.items():
        probe_out = tmp_path / f"probe_{name}"
        run_here(analyze_tool, "sections=[probe]", f"probe.checkpoint={path}",
                 f"probe.data_path={imagenet / 'train'}", "probe.trials=2", "probe.batch_size=4",
                 f"train.output_dir={probe_out}")
        probe = json.loads((probe_out / "analysis.json").read_text())["probe"]
        assert probe["checkpoint"] == str(path) and probe["trials"] == 2
        at_ckpt = probe["at_checkpoint"]["ratio_c_r"]["mean"]
        # MAE: teacher = student, nothing to be consistent with
        assert (at_ckpt == 0.0) == (name == "mae"), (name, at_ckpt)


def cfg(*overrides):
    return load_config(ANALYSIS_DEFAULTS, None, list(overrides))


def test_checks_before_any_work(tmp_path, imagenet):
    with pytest.raises(ConfigError, match="sections must be"):
        validate(cfg("sections=[linear,plots]"))
    with pytest.raises(ConfigError, match="compare.variants must be among"):
        validate(cfg("compare.variants=[mae,byol]", f"data.train_path={imagenet / 'train'}"))
    with pytest.raises(ConfigError, match="data.source=folder needs data.path"):  # the ViT-B recipe without data
        validate(cfg())
    with pytest.raises(ConfigError, match="probe needs probe.checkpoint"):
        validate(cfg("sections=[probe]"))
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match="probe.checkpoint needs images"):
        validate(cfg("sections=[probe]", f"probe.checkpoint={ckpt}"))
    with pytest.raises(FileNotFoundError, match="probe.data_path"):
        validate(cfg("sections=[probe]", f"probe.checkpoint={ckpt}", f"probe.data_path={tmp_path / 'none'}"))
    validate(cfg("sections=[probe]", f"probe.checkpoint={ckpt}", f"probe.data_path={imagenet / 'train'}"))


def test_a_resumed_run_counts_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 8, "recon": 1.0}, {"step": 8, "knn_top1": 50.0}, {"step": 16, "recon": 0.9},
               {"step": 16, "recon": 0.8}, {"step": 12, "probe_cos_r_c": -0.5}]  # resumed at 8: 16 logged again
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_metrics(path) == [records[1], records[0], records[4], records[3]]
