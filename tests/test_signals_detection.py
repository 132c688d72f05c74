"""tools/train_det.py at a job-control signal, sent as SLURM sends it (to every process of the run,
detectron2's DataLoader workers included): the iteration in progress finishes, the main process saves the
checkpoint detectron2's PeriodicCheckpointer would save at that iteration, and the run exits with the
signal's status, naming it; ``--resume`` (or a SLURM restart of the first command line) continues at the
next iteration.

A resumed detectron2 run is not bit-exact with an uninterrupted one (its data sampler and RNGs start
afresh: tests/test_detection.py checks the resume iteration only), so the saved state is compared where
it is exact: with the checkpoint of an uninterrupted run at the same iteration, every tensor of the
model, optimizer and LR scheduler equal; after the resume, the schedule (LR per iteration) continues as
the uninterrupted run's."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from fixtures import ROOT, process_tree  # noqa: E402

DEMO = ROOT / "configs" / "detection" / "demo_tiny.py"
ITERS = 8
# the demo with a seed (two runs train alike), 8 iterations with LR steps, an iteration logged each, no
# periodic checkpoint (a signal's is the only one), 2 DataLoader workers (which get the signal too)
SETTINGS = [f"train.max_iter={ITERS}", "train.eval_period=0", "train.log_period=1", "train.checkpointer.period=100",
            "train.checkpointer.max_to_keep=100", "lr_multiplier.scheduler.milestones=[5,7]",
            f"lr_multiplier.scheduler.num_updates={ITERS}", "dataloader.train.num_workers=2"]
SEEDED = f"""from detectron2.config import LazyConfig

_demo = LazyConfig.load({str(DEMO)!r})
model, dataloader, optimizer, lr_multiplier, train, datasets = (
    _demo[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train", "datasets"))
train.seed = 0
"""


def command(tmp_path: Path, out: Path, *overrides: str, options=()) -> list[str]:
    """The tool's command line: ``options`` first, ``key=value`` overrides after the settings."""
    config = tmp_path / "demo_seeded.py"
    if not config.exists():
        config.write_text(SEEDED)
    return [sys.executable, str(ROOT / "tools" / "train_det.py"), *options, "--config-file", str(config),
            f"train.output_dir={out}", *SETTINGS, *overrides]


def env(**extra) -> dict:
    # one thread: the runs compared are alike, and 2 cores shared with another test do not crawl
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run(tmp_path: Path, out: Path, *overrides: str, options=(), **extra_env) -> subprocess.CompletedProcess:
    done = subprocess.run(command(tmp_path, out, *overrides, options=options), capture_output=True, text=True, cwd=ROOT,
                          env=env(**extra_env), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged(out: Path) -> dict:
    """{iteration: metrics} of metrics.json (a resumed run appends to it)."""
    path = out / "metrics.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["iteration"]: r for r in rows if "lr" in r}


def stop_at_signal(tmp_path: Path, out: Path, signum: int, request, options=()) -> int:
    """Start the training in a session of its own, signal every process of it (trainer and DataLoader
    workers, as SLURM does) once iteration 1 is logged; check the stop; returns the last iteration done."""
    stderr = tmp_path / f"{out.name}.stderr"
    proc = subprocess.Popen(command(tmp_path, out, options=options), stdout=subprocess.DEVNULL,
                            stderr=open(stderr, "w"), cwd=ROOT, env=env(), start_new_session=True)
    request.addfinalizer(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    deadline = time.time() + 300
    while 1 not in logged(out):
        assert proc.poll() is None, stderr.read_text()[-3000:]
        assert time.time() < deadline, "no iteration logged in 300 s"
        time.sleep(0.02)
    assert len(process_tree(proc.pid)) >= 3, "the DataLoader workers are not running"
    os.killpg(proc.pid, signum)
    assert proc.wait(timeout=300) == 128 + signum, stderr.read_text()[-3000:]
    text = stderr.read_text()
    stopped = re.search(rf"stopped at {signal.Signals(signum).name} after iteration (\d+) of {ITERS}\. The last "
                        r"checkpoint is (\S+) \(--resume continues from it\)", text)
    assert stopped and "Traceback" not in text, text[-3000:]
    assert text.count("stopped at") == 1  # said once, by the main process
    assert "Exception during training" not in (out / "log.txt").read_text()
    iteration = int(stopped[1]) - 1
    assert 1 <= iteration < ITERS - 1  # stopped in the run, not at its end
    saved = out / f"model_{iteration:07d}.pth"
    assert Path(stopped[2]) == saved and (out / "last_checkpoint").read_text() == saved.name
    assert sorted(p.name for p in out.glob("model_*.pth")) == [saved.name]  # the signal's checkpoint only
    assert max(logged(out)) == iteration
    return iteration


def assert_same(a, b, where="checkpoint"):
    """Equal nested checkpoint contents, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_term_saves_the_iteration_and_resume_continues_from_the_next(tmp_path, request):
    out = tmp_path / "run"
    iteration = stop_at_signal(tmp_path, out, signal.SIGTERM, request)
    # an uninterrupted run, saving every iteration: at the stop's iteration it holds the same state
    straight = tmp_path / "straight"
    run(tmp_path, straight, "train.checkpointer.period=1")
    saved = load(out / f"model_{iteration:07d}.pth")
    assert saved["iteration"] == saved["trainer"]["iteration"] == iteration
    assert {"optimizer", "hooks"} <= saved["trainer"].keys()  # the optimizer and the LR scheduler hook
    assert_same(saved, load(straight / f"model_{iteration:07d}.pth"))

    run(tmp_path, out, options=["--resume"])
    log = (out / "log.txt").read_text()
    assert f"resumed at iteration {iteration + 1}" in log and f"Starting training from iteration {iteration + 1}" in log
    metrics, reference = logged(out), logged(straight)
    assert sorted(metrics) == list(range(ITERS))  # each iteration once: none repeated, none skipped
    assert [metrics[i]["lr"] for i in range(ITERS)] == [reference[i]["lr"] for i in range(ITERS)]
    final = load(out / "model_final.pth")
    assert final["iteration"] == ITERS - 1 and (out / "eval_results.json").is_file()


@pytest.mark.slow
def test_usr2_stops_too_and_a_slurm_restart_resumes_without_resume(tmp_path, request):
    """USR2 (SLURM's time-limit signal through submitit): status 140. SLURM reruns the first command line,
    without --resume: a restarted job resumes from the output directory all the same, and says so."""
    out = tmp_path / "run"
    iteration = stop_at_signal(tmp_path, out, signal.SIGUSR2, request)
    run(tmp_path, out, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    log = (out / "log.txt").read_text()
    assert "SLURM job 4242 restart 1: resuming from the last checkpoint" in log
    assert f"resumed at iteration {iteration + 1}" in log
    assert sorted(logged(out)) == list(range(ITERS)) and load(out / "model_final.pth")["iteration"] == ITERS - 1


@pytest.mark.slow
def test_processes_of_detectrons_launch_stop_together(tmp_path, request):
    """--num-gpus 2 (detectron2's launch: spawned processes, gloo on the CPU), each with its DataLoader
    workers, all signalled: both processes stop after the same iteration, the main one saves and names
    it, and the command ends with TERM's status, without a traceback from the launch."""
    out = tmp_path / "run"
    iteration = stop_at_signal(tmp_path, out, signal.SIGTERM, request,
                               options=["--num-gpus", "2", "--dist-url", "auto"])
    assert load(out / f"model_{iteration:07d}.pth")["iteration"] == iteration
