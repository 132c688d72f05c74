"""Command-line hygiene shared by every tool: fast --help, --print-config, close-match suggestions."""
import subprocess
import sys

import pytest
import yaml

from rcmae.core.config import ConfigError, load_config
from rcmae.pretrain.defaults import DEFAULTS

TOOLS = ["pretrain", "finetune", "linprobe", "knn", "eval_robustness", "export_encoder", "make_imagenet_c"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_imports_no_torch(tool):
    """--help is answered before torch, timm or the training code is imported (it takes ~0.1 s)."""
    code = (f"import sys\nfrom rcmae.tools import {tool}\ntry:\n    {tool}.main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('heavy:', sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
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
