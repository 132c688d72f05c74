"""tools/eval_robustness.py at a job-control signal, sent as SLURM sends it (to every process of the run,
DataLoader workers included): the cell in progress finishes, the run stops with the signal's status, the
finished cells stay in results.jsonl, and the rerun (a SLURM restart of the first command line, even a
--no-resume one) evaluates only the others, to the numbers of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fixtures import ROOT, make_benchmarks, process_tree

from rcmae.core import checkpoint as ck
from rcmae.core.vit import build_classifier
from rcmae.robustness.evaluate import RESULTS

TASKS = 8  # val, 4 ImageNet-C cells and an empty one, -A, -Sketch

# Runs the tool, pausing after the first batch of the first cell until the test has signalled every
# process of the run (the marker file tells it when): the signal lands in that cell, deterministically.
DRIVER = """
import sys, time
from pathlib import Path

import rcmae.robustness.evaluate as robustness
from rcmae.core import preemption
from rcmae.tools.eval_robustness import main

marker, evaluate = Path(sys.argv[1]), robustness.evaluate


def paused(loader):
    for batch in loader:
        yield batch
        if not marker.exists():
            marker.touch()
            deadline = time.time() + 120
            while preemption.received() is None and time.time() < deadline:
                time.sleep(0.01)


robustness.evaluate = lambda model, loader, *args, **kwargs: evaluate(model, paused(loader), *args, **kwargs)
main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory, imagenet):
    return make_benchmarks(tmp_path_factory.mktemp("benchmarks"), imagenet)


def arguments(tmp_path, benchmarks, out):
    torch.manual_seed(0)
    model = build_classifier("vit_micro_patch8", 32, 1000, "avg").eval()
    ckpt = tmp_path / "classifier.pth"
    torch.save({"format": ck.CLASSIFIER_FORMAT, "model": model.state_dict(), "arch": "vit_micro_patch8",
                "img_size": 32, "global_pool": "avg", "num_classes": 1000}, ckpt)
    return ["--checkpoint", ckpt, "--imagenet-val", benchmarks / "val", "--imagenet-c", benchmarks / "c",
            "--imagenet-c-resize", "--imagenet-a", benchmarks / "a", "--imagenet-sketch", benchmarks / "sketch",
            "--workers", "2", "--batch-size", "4", "train.device=cpu", "--output", out]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def tool(*args, **extra_env):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "eval_robustness.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env(**extra_env))


def scores(path) -> dict:
    """robustness.json without the timings (img/s), which are no result."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "img_per_s"}
        return x

    return strip(json.loads(path.read_text()))


@pytest.mark.slow
def test_term_stops_after_the_cell_and_a_slurm_restart_evaluates_only_the_rest(tmp_path, benchmarks, request):
    out = tmp_path / "run"
    args = arguments(tmp_path, benchmarks, out)
    marker = tmp_path / "first_batch_done"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), *map(str, args)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"),
                            start_new_session=True)  # its own process group, as a SLURM job step
    request.addfinalizer(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(0.02)
    assert len(process_tree(proc.pid)) >= 3, "the DataLoader workers of the cell are not running"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert f"stopped at SIGTERM after 1 of {TASKS} datasets/cells" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and not (out / "robustness.json").exists()
    kept = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [r["key"] for r in kept] == ["imagenet_val"] and kept[0]["n"] == 16  # the whole cell, then stopped

    # SLURM reruns the first command line: even with --no-resume, a restarted job keeps the finished cells
    rerun = tool(*args, "--no-resume", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "SLURM job 4242 restart 1: continuing from" in log
    assert f"resuming: 1 datasets / cells already in {out / RESULTS}" in log
    lines = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [r["key"] for r in lines].count("imagenet_val") == 1 and len(lines) == TASKS
    assert lines[0] == kept[0]  # kept as it was, not evaluated again

    straight = tool(*arguments(tmp_path, benchmarks, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert scores(out / "robustness.json") == scores(tmp_path / "straight" / "robustness.json")
