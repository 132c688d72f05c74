"""tools/train_det.py as the README runs it: shipped config names from any directory, ``--dry-run``
without ``--slurm`` (checks and plan, no training), and the demo with overrides."""
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from fixtures import ROOT  # noqa: E402
from test_detection import mini_checkpoint  # noqa: E402

from rcmae.tools import train_det  # noqa: E402

DEMO = ROOT / "configs" / "detection" / "demo_tiny.py"


def test_shipped_config_names_work_from_any_directory(tmp_path, monkeypatch, capsys):
    """The README's ``--config-file configs/detection/...`` and the short name, run outside the checkout."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "train_det.py"), "--config-file",
                          "configs/detection/demo_tiny.py", "--dry-run", f"train.output_dir={tmp_path / 'a'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"config:     {DEMO}" in res.stdout
    monkeypatch.chdir(tmp_path)
    assert train_det.run(["--config-file", "detection/demo_tiny", "--dry-run", "train.output_dir=b"]) is None
    assert f"config:     {DEMO}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="config file detection/demo_tin does not exist"):
        train_det.run(["--config-file", "detection/demo_tin", "--dry-run"])


def test_dry_run_checks_and_prints_the_plan_without_running(tmp_path, capsys):
    checkpoint, _ = mini_checkpoint(tmp_path)
    out = tmp_path / "out"
    start = time.monotonic()
    result = train_det.run(["--demo", "--dry-run", "--num-gpus", "2", f"train.output_dir={out}",
                            f"train.init_checkpoint={checkpoint}"])
    assert time.monotonic() - start < 30  # the demo itself trains for minutes
    assert result is None and not out.exists()  # nothing trained, nothing written
    plan = capsys.readouterr().out.splitlines()
    assert plan == [
        f"config:     {DEMO}",
        "run:        training, 60 iterations at batch 2 (1 per process), lr 0.0002, AMP off",
        "processes:  2, device cpu",
        "model:      GeneralizedRCNN, ViT 128 wide, 4 blocks, 256 px",
        f"dataset:    coins_demo (dataloader.train.dataset.names): built by the run in {out / 'demo_data'}",
        f"weights:    {checkpoint}",
        f"output dir: {out}"]


@pytest.mark.parametrize("options, overrides, message", [
    ([], ["train.max_iters=3"], "the config has no key train.max_iters (did you mean train.max_iter?)"),
    ([], ["train.init_checkpoint=/nowhere/pretrain.pth"], "train.init_checkpoint=/nowhere/pretrain.pth does not exist"),
    (["--num-gpus", "3"], [], "dataloader.train.total_batch_size=2 does not divide among 3 processes"),
])
def test_dry_run_of_a_bad_run_exits_with_the_error(tmp_path, capsys, options, overrides, message):
    with pytest.raises(SystemExit) as exit_:
        train_det.run(["--demo", "--dry-run", *options, f"train.output_dir={tmp_path / 'out'}", *overrides])
    assert message in str(exit_.value)
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()


def test_the_demo_takes_overrides_as_the_readme_writes_them(tmp_path, capsys):
    """``python tools/train_det.py --demo [--num-gpus 2] train.init_checkpoint=...``; without ``--demo`` the
    error says how to write it (real settings never fall back to the demo)."""
    checkpoint, _ = mini_checkpoint(tmp_path)
    for argv in (["--demo", f"train.init_checkpoint={checkpoint}"],
                 ["--demo", "--num-gpus", "2", f"train.init_checkpoint={checkpoint}"]):
        args = train_det.parse_args(argv)
        assert args.config_file == str(DEMO) and args.opts == [f"train.init_checkpoint={checkpoint}"]
        assert train_det.run(["--dry-run", *argv, f"train.output_dir={tmp_path / 'out'}"]) is None
        assert f"weights:    {checkpoint}" in capsys.readouterr().out
    assert args.num_gpus == 2
    with pytest.raises(SystemExit):
        train_det.parse_args([f"train.init_checkpoint={checkpoint}"])
    assert "or --demo for the CPU demo, which takes overrides too (--demo train.init_checkpoint=PATH)" in \
        capsys.readouterr().err
