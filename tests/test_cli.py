"""Command-line hygiene shared by every tool: fast --help, --print-config, close-match suggestions."""
import subprocess
import sys

import pytest
import yaml

from rcmae.core.config import ConfigError, load_config
from rcmae.pretrain.defaults import DEFAULTS

TOOLS = ["pretrain", "finetune", "linprobe", "knn", "eval_robustness", "export_encoder", "make_imagenet_c",
         "visualize", "train_det", "analyze_teacher", "measure_cost", "benchmark"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_imports_no_torch(tool):
    """--help is answered before torch, timm, detectron2 or the training code is imported (~0.1 s)."""
    code = (f"import sys\nfrom rcmae.tools import {tool}\ntry:\n    {tool}.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'timm', 'numpy', 'detectron2') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and res.stdout.strip().endswith("heavy: []")


def run_tool(*args):
    return subprocess.run([sys.executable, "-m", "rcmae.tools.pretrain", *args], capture_output=True, text=True,
                          timeout=120)


def test_print_config_shows_what_would_run(tmp_path):
    res = run_tool(f"data.path={tmp_path}", "optim.epochs=10", "--print-config")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["data"]["path"] == str(tmp_path) and cfg["optim"]["epochs"] == 10
    assert cfg["model"]["arch"] == "vit_base_patch16"  # the default recipe, not the demo
    demo = yaml.safe_load(run_tool("--demo", "--print-config").stdout)
    assert demo["model"]["arch"] == "vit_mini_patch8" and demo["data"]["source"] == "demo"
    shipped = yaml.safe_load(run_tool("--config-file", "pretrain/rcmae_vit_large", "--print-config").stdout)
    assert shipped["model"]["arch"] == "vit_large_patch16"  # a shipped config by name


def test_mistyped_keys_get_close_matches():
    with pytest.raises(ConfigError, match="unknown key 'optim.epoch'. Did you mean optim.epochs"):
        load_config(DEFAULTS, None, ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="Did you mean rcmae.teacher_mask"):
        load_config(DEFAULTS, None, ["rcmae.teacher_masks=same"])


def test_runs_record_how_they_ran_and_where_the_time_went(tmp_path, imagenet):
    """runs.jsonl: the command line, the git commit and the versions, one line per start; metrics.jsonl:
    wall time, the mean step and the share of it spent waiting for data. With the output piped (as under
    SLURM) no progress bar is drawn: the log has no carriage returns."""
    import json

    out = tmp_path / "run"
    args = [f"data.path={imagenet / 'train'}", "model.arch=vit_micro_patch8", "model.img_size=32",
            "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2", "optim.batch_size=8",
            "optim.epochs=2", "optim.warmup_epochs=0", "train.micro_batch=8", "data.num_workers=0",
            "train.device=cpu", "log.every_steps=2", "log.recon_every_epochs=0", f"train.output_dir={out}"]
    res = run_tool(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stdout and "\r" not in res.stderr
    run = json.loads((out / "runs.jsonl").read_text().splitlines()[0])
    assert run["argv"][1:] == args and run["world_size"] == 1
    assert len(run["git"]["commit"]) == 40  # the tests run from a checkout
    assert __import__("torch").__version__.startswith(run["versions"]["torch"]) and "timm" in run["versions"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert 0 < r["data_s"] <= r["step_s"] and 0 < r["data_wait_frac"] <= 1 and r["time"] > 1.7e9
    # a resumed run adds its own line
    assert run_tool(*args, "optim.epochs=3").returncode == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2


def test_console_scripts_exit_cleanly(tmp_path):
    """The installed entry points (``pip install .``) find their configs from any directory and exit 0."""
    import shutil

    script = shutil.which("rcmae-pretrain")
    assert script, "rcmae-pretrain is not on PATH: install the package (pip install -e .)"
    res = subprocess.run([script, "--config-file", "configs/pretrain/rcmae_vit_small.yaml", f"data.path={tmp_path}",
                          "--print-config"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert yaml.safe_load(res.stdout)["model"]["arch"] == "vit_small_patch16"
