"""Running a plan: here in order, under torchrun, or on SLURM as jobs with ``afterok`` dependencies.

Each job is its tool's command line; its folder holds what the tool writes and ``benchmark_job.json``,
the record of its attempts (command, times, exit status or SLURM job id). A job's state comes from its
folder (:mod:`rcmae.benchmark.collect`: finished, or state left to resume from) and from SLURM's queue,
so a rerun of the benchmark skips finished jobs, leaves queued and running ones alone, continues
interrupted ones (the tools resume from their output directory) and runs failed ones again.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rcmae.benchmark.collect import Outcome, outcome
from rcmae.benchmark.plan import SLURM_KEYS, Job, Launch
from rcmae.benchmark.report import write_text

RECORD = "benchmark_job.json"
CONSOLE = "console.log"  # the job's stdout and stderr (the tools' own log.txt has their log lines)
STATES = ("done", "running", "queued", "interrupted", "failed", "blocked", "todo")
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass
class JobState:
    state: str
    outcome: Outcome
    slurm_id: str | None = None
    detail: str = ""  # why it failed, SLURM's state, ...


def read_record(job: Job) -> dict:
    path = Path(job.dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"attempts": []}


def add_attempt(job: Job, attempt: dict) -> None:
    """Append (or, with the same ``started``, update) an attempt in the job's record, atomically."""
    record = read_record(job)
    attempts = [a for a in record["attempts"] if a.get("started") != attempt["started"]]
    record["attempts"] = [*attempts, attempt]
    Path(job.dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(job.dir) / RECORD, json.dumps(record, indent=2) + "\n")


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of a job: the queue's while it waits or runs, else ``scontrol``'s (kept a few minutes
    after the end), else the accounting's; None when none of them knows it."""
    queries = (["squeue", "-h", "-j", job_id, "-o", "%T"], ["scontrol", "show", "job", "-o", job_id],
               ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    for query in queries:
        if shutil.which(query[0]) is None:
            continue
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        text = out.stdout.strip()
        if out.returncode != 0 or not text:
            continue
        found = re.search(r"JobState=(\S+)", text) if query[0] == "scontrol" else None
        return (found.group(1) if found else text.split()[0]).upper()
    return None


def job_state(job: Job) -> JobState:
    """Where a job stands, from its folder, its record and SLURM."""
    out = outcome(job)
    if out.done:
        return JobState("done", out)
    attempts = read_record(job)["attempts"]
    last = attempts[-1] if attempts else {}
    if last.get("slurm_id"):
        sid = last["slurm_id"]
        state = slurm_job_state(sid)
        if state in SLURM_WAITING:
            return JobState("queued", out, sid, state)
        if state in SLURM_RUNNING:
            return JobState("running", out, sid, state)
        detail = f"SLURM job {sid}: {state or 'no longer known to SLURM'}"
        return JobState("interrupted" if out.started else "failed", out, sid, detail)
    if last and last.get("rc") is None and is_running(last.get("pid"), job):
        return JobState("running", out, detail=f"process {last['pid']}")
    if out.started:
        return JobState("interrupted", out, detail="stopped before the end: the next run continues it")
    if last:
        return JobState("failed", out, detail=f"exit status {last.get('rc')}: see {Path(job.dir) / CONSOLE}")
    return JobState("todo", out)


def is_running(pid, job: Job) -> bool:
    """Whether process ``pid`` is still this job's command (not another process that took its number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, TypeError):
        return False
    return f"rcmae.tools.{job.tool}" in cmdline


def command(job: Job, launch: Launch, dependency: list[str] = (), flags: list[str] = ()) -> list[str]:
    """The job's command line: its tool's, spread over processes the way the tool does it, or submitted
    with SLURM options. Options (the launcher's, ``flags``) come first: detection's config overrides end
    its command line."""
    tool = [sys.executable, "-m", f"rcmae.tools.{job.tool}"]
    if job.spread == "here":  # seconds of CPU work (the export, the pictures): never submitted
        return [*tool, *flags, *job.args]
    if launch.launcher == "slurm":
        return [*tool, *slurm_flags(job, dependency), *flags, *job.args]
    if launch.launcher == "torchrun" and launch.nproc > 1:
        if job.spread == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(launch.nproc), "-m", f"rcmae.tools.{job.tool}", *flags, *job.args]
        if job.spread == "detectron2":
            return [*tool, "--num-gpus", str(launch.nproc), *flags, *job.args]
    return [*tool, *flags, *job.args]


def slurm_flags(job: Job, dependency: list[str]) -> list[str]:
    s = job.slurm
    flags = ["--slurm", "--job-name", f"bench-{job.backbone}-{job.protocol}"]
    for key in SLURM_KEYS:
        if s.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(s[key])]
    for param in s.get("slurm_param", []):
        flags += ["--slurm-param", param]
    if dependency:  # the tool's checks of what the dependencies write run again when the job starts
        flags += ["--after", ":".join(dependency)]
    return flags


def run_here(job: Job, cmd: list[str]) -> int:
    """Run a job to its end in a child process, its output in the job's console.log; the attempt is
    recorded before it starts (with its pid) and after it ends (with its exit status). A Ctrl-C or TERM
    reaches the child, which saves and stops; then this process stops too."""
    Path(job.dir).mkdir(parents=True, exist_ok=True)
    attempt = {"launcher": "here", "command": cmd, "started": time.time()}
    with open(Path(job.dir) / CONSOLE, "a") as console:
        console.write(f"\n$ {' '.join(cmd)}\n")
        console.flush()
        child = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT)
        add_attempt(job, {**attempt, "pid": child.pid})
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        try:
            rc = wait(child)
        finally:
            signal.signal(signal.SIGTERM, previous)
    add_attempt(job, {**attempt, "pid": child.pid, "rc": rc, "ended": time.time()})
    if rc in (130, 128 + signal.SIGTERM, 128 + signal.SIGUSR2):  # stopped, saved: stop the benchmark too
        raise KeyboardInterrupt(f"{job.name} stopped (exit status {rc})")
    return rc


def wait(child: subprocess.Popen) -> int:
    """The child's exit status; a Ctrl-C (which the child got too: same process group) waits for it to save."""
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def submit(job: Job, cmd: list[str], dependency: list[str]) -> str:
    """Submit through the tool's own ``--slurm``; returns the SLURM job id it printed."""
    Path(job.dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    with open(Path(job.dir) / CONSOLE, "a") as console:
        console.write(f"\n$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    found = re.search(r"submitted job (\S+):", out.stdout)
    if out.returncode != 0 or not found:
        add_attempt(job, {"launcher": "slurm", "command": cmd, "started": started, "rc": out.returncode or 1})
        raise SubmitError(f"{job.name}: submission failed (exit status {out.returncode}): "
                          f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    job_id = found.group(1)
    add_attempt(job, {"launcher": "slurm", "command": cmd, "started": started, "slurm_id": job_id,
                      "dependency": list(dependency)})
    return job_id


class SubmitError(RuntimeError):
    """A tool refused a submission (its checks, or sbatch)."""


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)


def run_plan(jobs: list[Job], launch: Launch) -> dict[str, JobState]:
    """Bring every job of the plan forward once: run (here) or submit (SLURM) what is not finished, in
    dependency order. Here, a job whose dependency failed is ``blocked`` and the others go on. On SLURM,
    a job waits for its unfinished dependencies (``afterok``); one queued behind a dependency that is
    submitted again is cancelled and submitted again behind the new one."""
    states = {j.name: job_state(j) for j in jobs}
    renewed: dict[str, str] = {}  # job -> SLURM id submitted by this call
    bar = tqdm(jobs, desc="benchmark", unit="job", dynamic_ncols=True, disable=None)  # no bar in a log file
    for job in bar:
        bar.set_postfix_str(job.name)
        st = states[job.name]
        deps = [states[d] for d in job.deps]
        if st.state == "done":
            continue
        if any(d.state in ("failed", "blocked") for d in deps):
            states[job.name] = JobState("blocked", st.outcome, detail="a job it depends on failed")
            continue
        stale = st.state == "queued" and any(d in renewed for d in job.deps)  # behind a job that is no more
        if st.state in ("queued", "running") and not stale:
            continue
        if stale:
            cancel(st.slurm_id)
        if launch.launcher == "slurm" and job.spread != "here":
            dependency = [d.slurm_id for d in deps if d.state in ("queued", "running") and d.slurm_id]
            try:
                job_id = submit(job, command(job, launch, dependency), dependency)
            except SubmitError as e:
                tqdm.write(f"error: {e}")
                states[job.name] = JobState("failed", st.outcome, detail=str(e))
                continue
            renewed[job.name] = job_id
            states[job.name] = JobState("queued", st.outcome, job_id, "submitted")
            tqdm.write(f"{job.name}: submitted as SLURM job {job_id}"
                       + (f" (after {', '.join(dependency)})" if dependency else ""))
            continue
        if any(d.state != "done" for d in deps):  # here, dependencies run first; one still queued on SLURM
            states[job.name] = JobState("blocked", st.outcome, detail="a job it depends on is not finished")
            continue
        tqdm.write(f"{job.name}: {'continuing' if st.state == 'interrupted' else 'running'} "
                   f"(output in {Path(job.dir) / CONSOLE})")
        rc = run_here(job, command(job, launch))
        states[job.name] = job_state(job)
        if rc != 0 or states[job.name].state != "done":
            tqdm.write(f"{job.name}: failed (exit status {rc}); see {Path(job.dir) / CONSOLE}")
            states[job.name] = JobState("failed", states[job.name].outcome,
                                        detail=f"exit status {rc}: see {Path(job.dir) / CONSOLE}")
    bar.close()
    return states
