"""Job-control signals as a cluster sends them (to every process of the job, DataLoader workers included):
the run finishes its step, saves, and stops; a restarted job continues where it stopped."""
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
from fixtures import ROOT, free_port, micro_config, process_tree

from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
from rcmae.core.config import save_config
from rcmae.core.launcher import run_main
from rcmae.finetune.defaults import DEFAULTS as FINETUNE_DEFAULTS
from rcmae.pretrain.train import main as pretrain

LONG = ["optim.epochs=500", "checkpoint.every_epochs=0", "checkpoint.every_steps=0", "log.every_steps=1"]


def start_tool(tool: str, config: Path, *args: str, log: Path) -> subprocess.Popen:
    """The tool in a session of its own, so that the test can signal all its processes at once."""
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / tool), "--config-file", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT, start_new_session=True)


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run's metrics.jsonl has logged ``step`` (or a later one)."""
    metrics, deadline = out_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(int(s) >= step for s in re.findall(r'"step": (\d+)', metrics.read_text())):
            return
        assert proc.poll() is None, "the run ended before the test could signal it"
        time.sleep(0.05)
    pytest.fail(f"no step {step} in {metrics} after {timeout} s")


def weights(path) -> dict:
    raw = read_checkpoint(path).raw
    return {part: raw[part] for part in ("student", "teacher")}


def assert_equal_states(a: dict, b: dict) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_to_every_process_saves_the_step_and_resumes_exactly(tmp_path, signum):
    """As SLURM signals a job step: every process (the trainer and its 2 DataLoader workers) gets the
    signal. The trainer finishes the step in progress, saves it (no periodic checkpoint is due), and
    exits with the signal's status; the rerun continues to the same weights as an uninterrupted run."""
    config = tmp_path / "pretrain.yaml"
    save_config(micro_config(tmp_path / "run", [*LONG, "data.num_workers=2"]), config)
    proc = start_tool("pretrain.py", config, log=tmp_path / "stderr.txt")
    wait_for_step(tmp_path / "run", 3, proc)
    tree = process_tree(proc.pid)
    assert len(tree) >= 3, "the DataLoader workers have not started"
    for pid in tree:
        os.kill(pid, signum)
    assert proc.wait(timeout=120) == 128 + signum
    stderr = (tmp_path / "stderr.txt").read_text()
    stopped = re.search(rf"stopped at {signal.Signals(signum).name} after step (\d+) of 2000\. "
                        r"The last checkpoint is (\S+) ", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    step, path = int(stopped[1]), Path(stopped[2])
    assert path == tmp_path / "run" / f"checkpoint_{step:08d}.pth" == find_last_checkpoint(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").glob("checkpoint_*.pth")] == [path.name]
    straight = pretrain(micro_config(tmp_path / "straight", [*LONG, f"train.stop_at_step={step + 2}"]))
    resumed = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), "--config-file", str(config),
                              f"train.stop_at_step={step + 2}"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {path}" in (tmp_path / "run" / "log.txt").read_text()
    assert_equal_states(weights(find_last_checkpoint(tmp_path / "run")), weights(straight["checkpoint"]))


def test_the_handler_belongs_to_the_run_and_forked_workers_never_see_the_signals(micro_cfg):
    """While a run is on, its processes' forks (DataLoader workers) start with USR2 and TERM blocked (torch
    would give them a TERM handler that kills them); before and after, nothing is changed."""
    import multiprocessing

    from rcmae.core import preemption

    def child_mask(queue):
        queue.put(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def fork_and_read_mask():
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=child_mask, args=(queue,))
        child.start()
        child.join()
        return queue.get(timeout=10)

    before = {s: signal.getsignal(s) for s in preemption.JOB_SIGNALS}
    assert not set(preemption.JOB_SIGNALS) & fork_and_read_mask()
    handlers = preemption.install()
    try:
        assert set(preemption.JOB_SIGNALS) <= fork_and_read_mask()
        assert not set(preemption.JOB_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # not the parent
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not fatal
        assert preemption.received() == signal.SIGTERM and preemption.stop_requested() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received() == signal.SIGUSR2  # USR2 (requeue yourself) is not forgotten
    finally:
        preemption.restore(handlers)
    assert {s: signal.getsignal(s) for s in before} == before and preemption.received() is None
    assert not set(preemption.JOB_SIGNALS) & fork_and_read_mask()
    run_main(pretrain, micro_cfg("optim.epochs=1"))
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_the_signal(tmp_path, request):
    """USR2 to rank 1 only: rank 0 learns it from the all-reduce after the same step, saves there, and
    both stop; neither waits for the other in a collective that never comes."""
    config = tmp_path / "pretrain.yaml"
    save_config(micro_config(tmp_path / "run", [*LONG, "train.micro_batch=4"]), config)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                             str(ROOT / "tools" / "pretrain.py"), "--config-file", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"), cwd=ROOT,
                            start_new_session=True)
    request.addfinalizer(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    wait_for_step(tmp_path / "run", 3, proc)
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(ranks) == 2
    os.kill(int(ranks[1]), signal.SIGUSR2)
    proc.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    steps = re.findall(r"stopped at SIGUSR2 after step (\d+) of 2000", stderr)
    assert len(steps) == 2 and steps[0] == steps[1], stderr[-3000:]
    assert find_last_checkpoint(tmp_path / "run").name == f"checkpoint_{int(steps[0]):08d}.pth"


def test_a_slurm_restart_resumes_whatever_the_first_command_line_said(tmp_path, monkeypatch):
    """SLURM reruns a requeued job's first command line: ``--no-resume`` there must not throw the
    finished steps away. The restart is logged and recorded in runs.jsonl with the job id."""
    first = pretrain(micro_config(tmp_path / "run", ["train.stop_at_step=4"]))
    assert first["step"] == 4
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = pretrain(micro_config(tmp_path / "run", ["train.resume=none", "train.stop_at_step=8"]))
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    assert "SLURM job 4242 restart 1: continuing from" in log_txt and "train.resume='none'" in log_txt
    assert f"resuming from {first['checkpoint']}" in log_txt
    record = json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[-1])
    assert record["slurm"] == {"job_id": "4242", "restart_count": 1, "nodes": None, "ntasks": None}
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    straight = pretrain(micro_config(tmp_path / "straight", ["train.stop_at_step=8"]))
    assert again["step"] == 8
    assert_equal_states(weights(again["checkpoint"]), weights(straight["checkpoint"]))
    # a first start (no restart) with --no-resume does start over
    pretrain(micro_config(tmp_path / "run", ["train.resume=none", "train.stop_at_step=4"]))
    last_start = (tmp_path / "run" / "log.txt").read_text().rsplit("model vit_micro_patch8", 1)[-1]
    assert "resuming from" not in last_start and "continuing from" not in last_start


@pytest.mark.slow
def test_finetuning_stops_at_term_and_resumes_exactly(tmp_path, imagenet):
    """Fine-tuning (and the linear probe, which runs the same trainer) saves at the signal too."""
    from rcmae.core.config import load_config
    from rcmae.finetune.train import main as finetune

    def cfg(out, *extra):
        return load_config(FINETUNE_DEFAULTS, None, [
            "model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={imagenet / 'train'}",
            f"data.val_path={imagenet / 'val'}", "data.num_workers=2", "optim.batch_size=8", "optim.epochs=400",
            "optim.warmup_epochs=1", "train.micro_batch=8", "train.device=cpu", "eval.batch_size=8",
            "checkpoint.every_epochs=0", "eval.every_epochs=0", "log.every_steps=1", f"train.output_dir={out}",
            *extra])

    config = tmp_path / "finetune.yaml"
    save_config(cfg(tmp_path / "run"), config)
    proc = start_tool("finetune.py", config, log=tmp_path / "stderr.txt")
    wait_for_step(tmp_path / "run", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    stopped = re.search(r"stopped at SIGTERM after step (\d+) of ", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    step = int(stopped[1])
    assert find_last_checkpoint(tmp_path / "run").name == f"checkpoint_{step:08d}.pth"
    resumed = subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), "--config-file", str(config),
                              f"train.stop_at_step={step + 2}"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = finetune(cfg(tmp_path / "straight", f"train.stop_at_step={step + 2}"))
    a = read_checkpoint(find_last_checkpoint(tmp_path / "run")).raw["train_model"]
    b = read_checkpoint(straight["checkpoint"]).raw["train_model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_process_exits_with_its_workers_still_running():
    """Workers forked while the signals are noted ignore multiprocessing's TERM at exit; the process must not
    wait for them for ever (torch imported after the install, as when a tool's main module is loaded then)."""
    script = ("from rcmae.core import preemption\n"
              "preemption.install()\n"
              "import torch.utils.data\n"
              "batches = iter(torch.utils.data.DataLoader(range(64), num_workers=2))\n"
              "next(batches)\n")  # the iterator, and its workers, still alive at exit
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
