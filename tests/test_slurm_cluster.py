"""What a real SLURM cluster does with the jobs the project submits, on a private single-node cluster started by
the session (tests/slurm_cluster.py; skipped where it cannot start). Every real-SLURM test lives in this one
file, so that under ``-n 2 --dist loadfile`` one worker runs them all on one cluster."""
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, free_port, micro_config

from rcmae.analysis.linear_teacher import one_thread  # the jobs' thread count (OMP_NUM_THREADS=1)
from rcmae.core.checkpoint import CLASSIFIER_FORMAT, find_last_checkpoint, read_checkpoint
from rcmae.core.config import load_config, save_config
from rcmae.core.vit import build_classifier
from rcmae.finetune.defaults import DEFAULTS as FINETUNE_DEFAULTS
from rcmae.finetune.train import main as finetune
from rcmae.pretrain.train import main as pretrain

pytestmark = pytest.mark.slow


def wait_for_text(path, text, timeout=20.0) -> float:
    """Seconds until the file a job writes contains ``text``."""
    t0 = time.monotonic()
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() - t0 > timeout:
            content = path.read_text() if path.exists() else "(no file)"
            raise AssertionError(f"{path} has no {text!r} after {timeout:.0f} s: {content}")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_batch_job_runs_and_writes_its_output(slurm, tmp_path):
    """A plain ``sbatch`` from PATH with os.environ (what submitit does) reaches the cluster."""
    out = tmp_path / "out.txt"
    submitted = subprocess.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID"],
                               capture_output=True, text=True, check=True)
    job = submitted.stdout.strip()
    assert slurm.wait_for(job)["ExitCode"] == "0:0"
    assert out.read_text() == f"hello from {job}\n"


def test_job_larger_than_the_node_pends_forever(slurm):
    """SLURM accepts a job asking for more CPUs than the node has and leaves it PENDING instead of rejecting it
    (more GPUs than the node has is rejected at submission): the launcher has to check CPUs itself."""
    job = slurm.sbatch("-c", str(slurm.cpus + 1), "-o", "/dev/null", "--wrap", "true")
    try:
        time.sleep(3)  # a scheduling pass (sched_interval=2) that cannot place it
        info = slurm.job_info(job)
        assert (info["JobState"], info["Reason"]) == ("PENDING", "PartitionConfig")
    finally:
        slurm.cancel(job)
    slurm.wait_for(job, states=("CANCELLED",))
    rejected = slurm.run("sbatch", f"--gres=gpu:{slurm.gpus + 1}", "--wrap", "true", check=False)
    assert rejected.returncode == 1 and "Requested node configuration is not available" in rejected.stderr


@pytest.mark.parametrize("args,message", [
    (["--gpus-per-node", "0"], "each of 1 node(s) must give 1 task(s) x 10 CPUs = 10 CPUs, 0 GPU(s); 0 of its 1 "
                               "node(s) can (the largest has {cpus} CPUs, {gpus} GPUs"),
    (["--gpus-per-node", "8", "--cpus-per-task", "1", "train.micro_batch=1"], "Use --gpus-per-node {gpus} or less"),
    (["--gpus-per-node", "0", "--partition", "gpu"], "--partition gpu: SLURM has no such partition (sinfo lists "
                                                     "debug, debug-high)"),
])
def test_the_launcher_refuses_what_the_cluster_would_leave_pending(slurm, tmp_path, args, message):
    """The defaults (10 CPUs per task) on a smaller node, more GPUs than a node has, an unknown partition: said
    on the login node, with the fix, before anything is submitted (``sinfo``); what fits is submitted."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), "--demo", "--slurm", *args,
                          f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 1 and message.format(cpus=slurm.cpus, gpus=slurm.gpus) in res.stderr, res.stderr
    assert "submitted job" not in res.stdout and not (tmp_path / "run").exists()


def test_the_launcher_lets_through_what_fits(slurm):
    fits = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), "--demo", "--slurm", "--dry-run",
                           "--gpus-per-node", "0", "--cpus-per-task", str(slurm.cpus)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert fits.returncode == 0 and f"#SBATCH --cpus-per-task={slurm.cpus}" in fits.stdout, fits.stderr


def test_job_on_the_fake_gpus_runs_one_task_per_gpu(slurm, tmp_path):
    out = tmp_path / "tasks.txt"
    job = slurm.sbatch("--gpus-per-node", str(slurm.gpus), "--ntasks-per-node", str(slurm.gpus), "-o", str(out),
                       "--wrap", "srun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'")
    slurm.wait_for(job)
    assert sorted(out.read_text().splitlines()) == [f"task {i} of {slurm.gpus}" for i in range(slurm.gpus)]


# ------------------------------------------------------------------------------ the tools on the cluster
def submit(tool: str, *args) -> str:
    """``tools/<tool> --slurm ... ARGS`` as a user types it on the login node; the job id."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--slurm", "--gpus-per-node", "0",
                          "--cpus-per-task", "1", "--timeout", "10", *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # sbatch passes it on: one thread a task
    assert res.returncode == 0, res.stderr[-3000:]
    return re.search(r"submitted job (\d+)", res.stdout)[1]


def wait_for_step(out_dir: Path, step: int, slurm, job: str, timeout: float = 120) -> None:
    """Until the job's metrics.jsonl has logged ``step``."""
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and any(int(s) >= step for s in re.findall(r'"step": (\d+)', metrics.read_text()))):
        assert time.monotonic() < deadline, f"no step {step} in {metrics}: {slurm.job_info(job)}"
        time.sleep(0.1)


def wait_for_file(path: Path, slurm, job: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        assert time.monotonic() < deadline, f"no {path}: {slurm.job_info(job)}"
        time.sleep(0.05)


def restarted_well(slurm, job: str, out_dir: Path, timeout: float = 180) -> str:
    """Wait for the job to complete after its interruption: restarted, a success result, no traceback in
    its logs. Returns the log of the run (log.txt)."""
    info = slurm.wait_for(job, timeout=timeout)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "0:0", info
    status, value = job_result(out_dir, job)
    assert status == "success", value
    assert "Traceback" not in (out_dir / "submitit" / job / f"{job}_0_log.err").read_text()
    return (out_dir / "log.txt").read_text()


def job_result(out_dir: Path, job: str, task: int = 0):
    """What submitit stored for the task: ("success", summary) or ("error", traceback)."""
    with open(out_dir / "submitit" / job / f"{job}_{task}_result.pkl", "rb") as f:
        return pickle.load(f)


def finished_after_interruption(slurm, job: str, out_dir: Path, signame: str, tasks: int = 1,
                                timeout: float = 180) -> tuple[dict, int]:
    """Wait for the job to complete after its interruption; check that it ended well: restarted, each task's
    result a success, the stop saved at the step in progress and the restart resumed from that checkpoint.
    Returns the job's record and the step it stopped at."""
    info = slurm.wait_for(job, timeout=timeout)
    assert int(info["Restarts"]) >= 1 and info["ExitCode"] == "0:0", info
    for task in range(tasks):
        status, value = job_result(out_dir, job, task)
        assert status == "success", value
    log_txt = (out_dir / "log.txt").read_text()
    stopped = re.search(rf"stopped at {signame} after step (\d+) of \d+: state saved", log_txt)
    assert stopped, log_txt[-3000:]
    step = int(stopped[1])
    assert re.search(rf"resum(ing|ed) from {out_dir / f'checkpoint_{step:08d}.pth'}", log_txt), log_txt[-3000:]
    assert "Traceback" not in (out_dir / "submitit" / job / f"{job}_0_log.err").read_text()
    trained = [r["step"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert trained == list(range(1, trained[-1] + 1))  # every step once: none lost, none done twice
    runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["slurm"]["restart_count"] for r in runs][:2] == [0, 1] and {r["slurm"]["job_id"] for r in runs} == {job}
    assert all(Path(r["argv"][0]).name in ("pretrain.py", "finetune.py") and "--slurm" in r["argv"] for r in runs)
    return info, step


def assert_same_weights(a_path, b_path, parts=("student", "teacher")) -> None:
    a, b = read_checkpoint(a_path).raw, read_checkpoint(b_path).raw
    assert a["step"] == b["step"]
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def straight(cfg: dict, out_dir: Path) -> Path:
    """The uninterrupted run's last checkpoint, in this process; without workers (the same batches: every
    image's crop is seeded by its index), since forking the test process for each epoch's workers is slow."""
    cfg = copy.deepcopy(cfg)
    cfg["train"]["output_dir"], cfg["data"]["num_workers"] = str(out_dir), 0
    with one_thread():
        return pretrain(cfg)["checkpoint"]


def pretrain_config(tmp_path, *overrides):
    """A micro pretraining with DataLoader workers (SLURM signals them too), long enough to interrupt."""
    cfg = micro_config(tmp_path / "run", ["optim.epochs=500", "checkpoint.every_epochs=0", "log.every_steps=1",
                                          "data.num_workers=1", *overrides])
    save_config(cfg, tmp_path / "pretrain.yaml")
    return tmp_path / "pretrain.yaml", cfg


def test_pretraining_preempted_saves_requeues_itself_and_resumes(slurm, tmp_path):
    """A job of the higher-priority partition takes the node: USR2 at once (preempt_send_user_signal), the run
    saves and requeues itself (SLURM would count a job that just exits as finished), resumes afterwards."""
    config, cfg = pretrain_config(tmp_path, "train.stop_at_step=500")
    job = submit("pretrain.py", "--config-file", config)
    wait_for_step(tmp_path / "run", 3, slurm, job)
    slurm.preempt(seconds=3)
    finished_after_interruption(slurm, job, tmp_path / "run", "SIGUSR2")
    assert_same_weights(find_last_checkpoint(tmp_path / "run"), straight(cfg, tmp_path / "straight"))


@pytest.mark.skipif(os.environ.get("RCMAE_SLURM_TIME_LIMIT_TEST") != "1",
                    reason="on request (RCMAE_SLURM_TIME_LIMIT_TEST=1): SLURM sends the time-limit signal at its "
                           "next 30 s timer tick, so on a loaded machine an allocation may do next to nothing")
def test_pretraining_at_its_time_limit_saves_requeues_and_resumes(slurm, tmp_path):
    """``--timeout 1 --signal-delay-s 35``: USR2 about 35 s before the limit; the run saves, requeues itself
    (submitit counts it against --max-requeues) and finishes in a later allocation. The path after the
    signal is the preemption's, which the suite always runs."""
    config, cfg = pretrain_config(tmp_path, "optim.epochs=750")  # 3000 steps, about 35 s
    job = submit("pretrain.py", "--config-file", config, "--timeout", "1", "--signal-delay-s", "35")
    finished_after_interruption(slurm, job, tmp_path / "run", "SIGUSR2", timeout=300)
    assert_same_weights(find_last_checkpoint(tmp_path / "run"), straight(cfg, tmp_path / "straight"))


def test_two_tasks_requeued_stop_together_and_resume_despite_no_resume(slurm, tmp_path):
    """``--gpus-per-node 2``: two tasks (fake GPUs, gloo on the CPU), one process group. ``scontrol requeue``
    signals every process of both (TERM); they agree on the step, rank 0 saves it, both exit. SLURM restarts
    the job with its first command line, ``--no-resume`` included, and the restarted pair continues from
    the saved step all the same, to where an uninterrupted 2-process torchrun run ends."""
    config, cfg = pretrain_config(tmp_path, "train.stop_at_step=150", "train.micro_batch=4")
    job = submit("pretrain.py", "--config-file", config, "--gpus-per-node", "2", "--no-resume")
    wait_for_step(tmp_path / "run", 3, slurm, job)
    slurm.requeue(job)
    finished_after_interruption(slurm, job, tmp_path / "run", "SIGTERM", tasks=2)
    assert "continuing from" in (tmp_path / "run" / "log.txt").read_text()  # not train.resume='none'
    assert json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[0])["world_size"] == 2
    cfg["train"]["output_dir"], cfg["data"]["num_workers"] = str(tmp_path / "straight"), 0
    save_config(cfg, tmp_path / "straight.yaml")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                          str(ROOT / "tools" / "pretrain.py"), "--config-file", str(tmp_path / "straight.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(find_last_checkpoint(tmp_path / "run"), find_last_checkpoint(tmp_path / "straight"))


def test_finetuning_requeued_resumes_exactly(slurm, tmp_path, imagenet):
    """``tools/finetune.py --slurm`` (the linear probe runs the same trainer), interrupted by a requeue."""
    cfg = load_config(FINETUNE_DEFAULTS, None, [
        "model.arch=vit_micro_patch8", "model.img_size=32", f"data.train_path={imagenet / 'train'}",
        f"data.val_path={imagenet / 'val'}", "data.num_workers=1", "optim.batch_size=8", "optim.epochs=40",
        "optim.warmup_epochs=1", "train.micro_batch=8", "eval.batch_size=8", "checkpoint.every_epochs=0",
        "eval.every_epochs=20", "log.every_steps=1", f"train.output_dir={tmp_path / 'run'}"])
    save_config(cfg, tmp_path / "finetune.yaml")
    job = submit("finetune.py", "--config-file", tmp_path / "finetune.yaml")
    wait_for_step(tmp_path / "run", 3, slurm, job)
    slurm.requeue(job)
    finished_after_interruption(slurm, job, tmp_path / "run", "SIGTERM")
    cfg["train"]["output_dir"], cfg["data"]["num_workers"] = str(tmp_path / "straight"), 0
    with one_thread():
        reference = finetune(cfg)
    assert_same_weights(find_last_checkpoint(tmp_path / "run"), reference["checkpoint"], parts=("train_model",))


def test_detection_requeued_resumes_at_the_next_iteration(slurm, tmp_path):
    """``tools/train_det.py --slurm`` (detectron2's trainer), requeued after its first iterations: the iteration
    in progress is saved (``model_<iter>.pth``), the restarted job resumes at the next one although its command
    line has no ``--resume``, and trains every iteration once. (A resumed detectron2 run is not bit-exact:
    its sampler starts afresh; test_signals_detection.py compares the saved state with a straight run's.)"""
    pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")
    from test_signals_detection import ITERS, SEEDED, SETTINGS, logged

    (tmp_path / "demo_seeded.py").write_text(SEEDED)
    out = tmp_path / "run"
    job = submit("train_det.py", "--config-file", tmp_path / "demo_seeded.py", f"train.output_dir={out}", *SETTINGS)
    deadline = time.monotonic() + 180
    while 1 not in logged(out):
        assert time.monotonic() < deadline, slurm.job_info(job)
        time.sleep(0.05)
    slurm.requeue(job)
    log_txt = restarted_well(slurm, job, out, timeout=300)
    stopped = re.search(rf"stopped at SIGTERM after iteration (\d+) of {ITERS}: state saved", log_txt)
    assert stopped, log_txt[-3000:]
    assert f"SLURM job {job} restart 1: resuming from the last checkpoint in {out}" in log_txt
    assert f"resumed at iteration {int(stopped[1])}" in log_txt
    assert sorted(logged(out)) == list(range(ITERS))  # each iteration trained once
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == ITERS - 1


def test_robustness_requeued_keeps_its_finished_cells(slurm, tmp_path, imagenet):
    """``tools/eval_robustness.py --slurm --no-resume``, requeued once its first results are in: the finished
    datasets / ImageNet-C cells stay in results.jsonl, the restarted job evaluates the others only (its first
    command line's ``--no-resume`` notwithstanding), and the report equals an uninterrupted run's."""
    from test_signals_robustness import scores, tool

    bench = tmp_path / "bench"
    for corruption in ("fog", "snow", "saturate", "contrast"):
        for severity in range(1, 6):
            for src in sorted((imagenet / "val").glob("*/*.JPEG"))[::4]:
                dst = bench / "c" / corruption / str(severity) / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    torch.manual_seed(0)
    torch.save({"format": CLASSIFIER_FORMAT, "arch": "vit_micro_patch8", "img_size": 32, "global_pool": "avg",
                "num_classes": 1000, "model": build_classifier("vit_micro_patch8", 32, 1000, "avg").state_dict()},
               tmp_path / "classifier.pth")
    args = ["--checkpoint", tmp_path / "classifier.pth", "--imagenet-val", imagenet / "val", "--imagenet-c",
            bench / "c", "--imagenet-c-resize", "--workers", "1", "--batch-size", "4", "train.device=cpu"]
    job = submit("eval_robustness.py", *args, "--output", tmp_path / "run", "--no-resume")
    wait_for_file(tmp_path / "run" / "results.jsonl", slurm, job)
    slurm.requeue(job)
    log_txt = restarted_well(slurm, job, tmp_path / "run")
    stopped = re.search(r"stopped at SIGTERM after (\d+) of 21 datasets/cells", log_txt)
    assert stopped and f"continuing from {tmp_path / 'run'}" in log_txt, log_txt[-3000:]
    assert f"resuming: {stopped[1]} datasets / cells already in" in log_txt
    keys = [json.loads(line)["key"] for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 21
    straight = tool(*args, "--output", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert scores(tmp_path / "run" / "robustness.json") == scores(tmp_path / "straight" / "robustness.json")
