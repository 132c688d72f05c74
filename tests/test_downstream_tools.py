"""Shipped downstream configs, the demo of each tool end to end, and the pretraining k-NN monitor."""
import json
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, micro_config, run_in_process

from rcmae.core.config import load_config
from rcmae.finetune import knn_tool
from rcmae.finetune.defaults import KNN_TOOL_DEFAULTS
from rcmae.pretrain.train import main as pretrain_main
from rcmae.tools import finetune, knn, linprobe

CONFIGS = ROOT / "configs"
TOOLS = {"finetune.py": finetune, "linprobe.py": linprobe, "knn.py": knn}


def run_tool(name, *args):
    """``python tools/<name> ARGS``, in this process (fixtures.run_in_process): these tests are about what the
    demos run and write; the command line's exit status is tests/test_bad_input.py's and test_cli.py's."""
    return run_in_process(TOOLS[name], *args)


@pytest.mark.slow
def test_finetune_linprobe_knn_demos(tmp_path):
    res = run_tool("finetune.py", "--demo", f"train.output_dir={tmp_path / 'ft'}", "optim.epochs=6",
                   "eval.every_epochs=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best_classifier" in res.stdout and (tmp_path / "ft" / "classifier_best.pth").is_file()
    wnids = sorted(p.name for p in (tmp_path / "ft" / "demo_data" / "train").iterdir())
    assert wnids == ["n02123045", "n03773504", "n03785016", "n07920052"]
    evals = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
             if "eval_top1" in x]
    assert [e["epoch"] for e in evals] == [3, 6] and all(e["eval_n"] == 32 for e in evals)

    res = run_tool("linprobe.py", "--demo", f"train.output_dir={tmp_path / 'lp'}", "optim.epochs=3")
    assert res.returncode == 0, res.stderr[-3000:]
    saved = torch.load(tmp_path / "lp" / "classifier_best.pth", weights_only=True)
    assert saved["mode"] == "linprobe" and saved["model"]["head.weight"].shape == (1000, 128)

    res = run_tool("knn.py", "--demo", f"train.output_dir={tmp_path / 'knn'}")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert result["knn_n"] == 32 and 0 <= result["knn_top1"] <= 100


def test_knn_tool_and_pretraining_monitor_agree(tmp_path):
    """The monitor's k-NN of the teacher equals the standalone tool on the saved checkpoint."""
    out = pretrain_main(micro_config(tmp_path / "pre", ["optim.epochs=1", "knn.every_epochs=1",
                                                        "knn.source=demo", "knn.batch_size=16"]))
    monitor = [json.loads(x) for x in Path(out["metrics"]).read_text().splitlines() if "knn_top1" in x]
    assert len(monitor) == 1 and monitor[0]["knn_n"] == 32
    cfg = load_config(KNN_TOOL_DEFAULTS, None, [
        "model.arch=vit_micro_patch8", "model.img_size=32", f"init.checkpoint={out['checkpoint']}",
        f"data.train_path={tmp_path / 'pre' / 'knn_demo_data' / 'train'}",
        f"data.val_path={tmp_path / 'pre' / 'knn_demo_data' / 'val'}", "data.label_space=imagenet1k",
        "data.num_workers=0", "train.device=cpu", f"train.output_dir={tmp_path / 'knn'}"])
    standalone = knn_tool.main(cfg)
    assert standalone["knn_top1"] == monitor[0]["knn_top1"]
    assert standalone["knn_top5"] == monitor[0]["knn_top5"]
