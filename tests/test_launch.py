import argparse
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
from fixtures import ROOT, micro_config, run_in_process

from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
from rcmae.core.distributed import DistEnv, env_from_variables
from rcmae.core.launcher import add_launch_args, launch
from rcmae.pretrain.train import main
from rcmae.tools import export_encoder as export_tool
from rcmae.tools import pretrain as pretrain_tool


def run_tool(*args, timeout=300):
    """``python tools/pretrain.py ARGS`` in a process of its own, as a shell runs it."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_tool_here(*args):
    """The same command line in this process (fixtures.run_in_process: status, stdout and stderr as a shell
    would see them, an unexpected exception fails the test): what it checks, prints and runs."""
    return run_in_process(pretrain_tool, *args)


def test_rank_layout_from_torchrun_and_slurm_variables():
    assert env_from_variables({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})[0] == DistEnv(5, 8, 1)
    layout, extra = env_from_variables({"SLURM_PROCID": "11", "SLURM_NTASKS": "32", "SLURM_LOCALID": "3",
                                        "MASTER_ADDR": "node7", "SLURM_JOB_ID": "123"})
    assert layout == DistEnv(11, 32, 3) and extra == {"MASTER_ADDR": "node7", "MASTER_PORT": "20123"}
    # torchrun inside a SLURM allocation wins; one SLURM task is a single process
    assert env_from_variables({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0",
                               "SLURM_NTASKS": "4"})[0] == DistEnv(0, 2, 0)
    assert env_from_variables({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})[0] == DistEnv()


def test_slurm_dry_run_prints_the_job(imagenet):
    res = run_tool_here("--config-file", "configs/pretrain/rcmae_vit_base.yaml", "--slurm", "--nodes", "4",
                        "--gpus-per-node", "8", "--partition", "gpu", "--timeout", "4320", "--dry-run",
                        "--slurm-param", "exclusive=true", "--slurm-param", "reservation=big",
                        f"data.path={imagenet / 'train'}", "train.micro_batch=64")
    assert res.returncode == 0, res.stderr
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4320", "#SBATCH --signal=USR2@120",
                 "#SBATCH --mem=0", "#SBATCH --exclusive", "#SBATCH --reservation=big"):
        assert line in res.stdout.splitlines(), line
    res = run_tool_here("--config-file", "configs/pretrain/rcmae_vit_base.yaml", "--slurm", "--mem-gb", "480",
                        "--dry-run", f"data.path={imagenet / 'train'}")
    assert "#SBATCH --mem=480GB" in res.stdout.splitlines(), res.stderr


@pytest.mark.parametrize("args,message", [
    (["data.path=/no/such/imagenet/train"], "data.path: image folder /no/such/imagenet/train does not exist"),
    (["--nodes", "3", "train.micro_batch=256"], "multiple of train.micro_batch"),  # 4096 over 24 GPUs
    (["model.arch=vit_base_patch15"], "unknown model.arch"),
    (["train.init=/no/such/mae_pretrain_vit_base.pth"], "train.init: checkpoint /no/such/mae_pretrain_vit_base.pth"),
    (["--slurm-param", "exclusive"], "--slurm-param 'exclusive' is not KEY=VALUE"),
])
def test_slurm_job_is_checked_before_submission(imagenet, args, message):
    """Everything that can be checked on the login node fails there, with the job's world size
    (nodes x GPUs per node), before anything is submitted."""
    opts = [a for a in args if not a.startswith("--") and "=" in a]
    flags = [a for a in args if a not in opts]
    res = run_tool_here("--slurm", "--dry-run", "--nodes", "4", *flags, f"data.path={imagenet / 'train'}", *opts)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "sbatch" not in res.stdout


def test_unknown_key_on_the_command_line_is_a_clear_error():
    res = run_tool("optim.lr_base=1")
    assert res.returncode != 0
    assert "error: command line: unknown key 'optim.lr_base'" in res.stderr and "optim.base_lr" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_data_folder_is_a_clear_error(tmp_path):
    res = run_tool_here("--config-file", "configs/pretrain/demo.yaml", "data.source=folder",
                        f"data.path={tmp_path / 'nope'}", f"train.output_dir={tmp_path / 'out'}")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"data.path: image folder {tmp_path / 'nope'} does not exist" in res.stderr


@pytest.mark.slow
def test_submitit_local_requeue_resumes(tmp_path, monkeypatch):
    """USR2 to the task, as SLURM sends before a preemption or time limit: the task finishes its step,
    saves it, and requeues itself through submitit (Job.checkpoint); the requeued task resumes there."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    overrides = ["optim.epochs=500", "train.stop_at_step=400", "checkpoint.every_epochs=0", "log.every_steps=1"]
    args = launcher_args(["--slurm", "--local", "--timeout", "10"])
    job = launch(main, micro_config(tmp_path / "run", overrides), args, "test")
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        assert time.time() < deadline and not job.done(), "the job did not reach step 3"
        time.sleep(0.05)
    controller = job._process.pid
    tasks = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(tasks) == 1
    os.kill(int(tasks[0]), signal.SIGUSR2)
    result = job.result()
    assert result["step"] == 400
    log = (tmp_path / "run" / "log.txt").read_text()
    stopped = re.search(r"stopped at SIGUSR2 after step (\d+) of 400: state saved", log)
    assert stopped and f"resuming from {tmp_path / 'run' / f'checkpoint_{int(stopped[1]):08d}.pth'}" in log, log
    runs = [json.loads(line) for line in (tmp_path / "run" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and all(r["argv"] == sys.argv for r in runs)  # the user's command, not _submit.py
    straight = main(micro_config(tmp_path / "straight", overrides))
    a = read_checkpoint(find_last_checkpoint(tmp_path / "run")).raw
    b = read_checkpoint(straight["checkpoint"]).raw
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def launcher_args(argv):
    p = argparse.ArgumentParser()
    add_launch_args(p)
    return p.parse_args(argv)


@pytest.mark.slow
def test_demo_cli_end_to_end_and_export(tmp_path):
    res = run_tool_here("--demo", "optim.epochs=4", f"train.output_dir={tmp_path / 'demo'}",
                        "log.recon_every_epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("checkpoint_00000032.pth", "encoder_teacher.pth", "metrics.jsonl", "config.yaml",
                 "reconstruction_epoch0004.png", "log.txt"):
        assert (out / name).is_file(), name
        assert str(out / name) in res.stdout or name in ("config.yaml", "log.txt",
                                                        "checkpoint_00000032.pth")
    assert len(list((out / "demo_data").rglob("*.jpg"))) == 8 * 32
    export_tool.main([str(out / "checkpoint_00000032.pth"), str(tmp_path / "student.pth"),
                      "--which", "student"])
    enc = torch.load(tmp_path / "student.pth", weights_only=True)
    assert enc["meta"]["which"] == "student" and "blocks.0.attn.qkv.weight" in enc["model"]
    assert not any(k.startswith(("decoder", "mask_token")) for k in enc["model"])


def test_a_requeue_terminated_by_its_own_requeue_is_no_error():
    """SLURM terminates the job step's processes on ``scontrol requeue``, the scontrol itself when it is slower:
    that SIGTERM is the requeue working (the CI's SLURM test caught the traceback it used to print); any other
    failure of scontrol is still raised."""
    import signal
    import subprocess

    from rcmae.core.launcher import requeue_quietly

    def requeue_dying_by(code):
        def requeue(signum, frame):
            raise subprocess.CalledProcessError(code, ["scontrol", "requeue", "5"])
        return requeue

    requeue_quietly(requeue_dying_by(-signal.SIGTERM))
    with pytest.raises(subprocess.CalledProcessError):
        requeue_quietly(requeue_dying_by(1))
