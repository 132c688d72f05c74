"""Stopping cleanly at a job-control signal, and starting again where the run stopped.

SLURM sends the job's ``--signal`` (USR2 through submitit: about 120 s before the time limit, and at a
preemption) and TERM (``scontrol requeue``, a preemption after its grace time, ``scancel``) to every
process of the job step, DataLoader workers included. :func:`install` notes the signal in the process
that installed the handler, and the processes it forks (DataLoader workers, ours or detectron2's) start
with both signals blocked: torch gives its workers a TERM handler that kills them, and the main process
would then fail on the dead worker instead of saving. The trainers ask :func:`stop_requested` after each
step (every rank gets the same answer), save a checkpoint and raise :class:`Interrupted`; the launcher
then requeues (USR2) or exits (TERM: SLURM requeues by itself, or the job was cancelled). A job SLURM
restarts resumes from its output directory whatever its first command line said (:func:`restart_count`,
used by ``start_run``).
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # registers its exit function now: ours, registered later, runs first
import os
import signal
from collections.abc import Callable
from pathlib import Path

JOB_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_owner_pid: int | None = None  # the process whose handler acts
_received: int | None = None  # USR2 wins over TERM: after it the job must requeue itself
_fork_hooks = False


class Interrupted(BaseException):
    """A run stopped at a job-control signal, its state saved. A ``BaseException`` like
    ``KeyboardInterrupt``: libraries' ``except Exception`` blocks (detectron2's trainer logs those as
    failures) let it through to the launcher."""

    def __init__(self, signum: int, done: str):
        self.signum, self.done = signum, done
        super().__init__(f"stopped at {signal.Signals(signum).name} after {done}")


def _note(signum: int, frame) -> None:
    global _received
    if os.getpid() == _owner_pid and _received != signal.SIGUSR2:
        _received = signum


def _kill_daemonic_children() -> None:
    """At exit, before multiprocessing terminates its daemonic children (DataLoader workers) with TERM,
    which they would no longer see, and waits for them for ever: they are killed instead."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def _block_before_fork() -> None:
    if os.getpid() == _owner_pid:  # the child inherits the mask; a handler it would replace
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)


def _unblock_after_fork() -> None:
    if os.getpid() == _owner_pid:  # a signal that came meanwhile is delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


def install() -> dict:
    """Note USR2 and TERM in this process from now on, instead of dying (TERM) or running another
    handler (submitit's USR2 handler requeues at once, from inside whatever the process was doing), and
    fork children that never see them. Python's ``subprocess`` (exec, no ``preexec_fn``) is unaffected;
    so are workers started by ``spawn`` or ``forkserver`` (the DataLoader's default is ``fork`` on Linux
    up to Python 3.13). Returns the handlers it replaced, for :func:`restore`: none when this process
    notes the signals already (a signal noted then is kept)."""
    global _owner_pid, _received, _fork_hooks
    if _owner_pid == os.getpid() and all(signal.getsignal(s) is _note for s in JOB_SIGNALS):
        return {}
    _owner_pid, _received = os.getpid(), None
    previous = {signum: signal.signal(signum, _note) for signum in JOB_SIGNALS}
    if not _fork_hooks:  # registered hooks cannot be removed: once per process
        os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork)
        atexit.register(_kill_daemonic_children)  # runs before multiprocessing's own exit function
        _fork_hooks = True
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers :func:`install` replaced (nothing when it replaced none: an enclosing
    install restores); the noted signal belonged to the run it stopped."""
    global _owner_pid, _received
    if not previous:
        return
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _owner_pid, _received = None, None


@contextlib.contextmanager
def noting_signals():
    """:func:`install` for the duration of a run, then :func:`restore`."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)


def received() -> int | None:
    """The signal this process got, if any."""
    return _received


def stop_requested() -> int | None:
    """The signal to stop for, the same on every rank (the first rank that got one decides for all),
    or None. Called by every rank at the same point of the loop: one small all-reduce on the CPU."""
    import torch  # not at the top: the tools' --help imports this module, and must start fast

    from rcmae.core.distributed import all_reduce, control_group, world_size

    if world_size() == 1:
        return _received
    code = {None: 0, signal.SIGTERM: 1, signal.SIGUSR2: 2}[_received]
    agreed = int(all_reduce(torch.tensor([code]), torch.distributed.ReduceOp.MAX, control_group()).item())
    return {0: None, 1: signal.SIGTERM, 2: signal.SIGUSR2}[agreed]


def restart_count() -> int:
    """How often SLURM has restarted this job (requeue, preemption, node failure); 0 outside SLURM."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def resume_on_restart(out_dir: str | Path, resumes: bool, has_saved_state: Callable[[Path], bool],
                      first_start: str, action: str = "continuing from") -> str | None:
    """The one restart rule of every job: a job SLURM restarted (requeue, preemption, node failure) continues
    from what its output directory holds, whatever its first command line said (``first_start``): SLURM reruns
    that command, and starting afresh there would throw away the steps done since. Returns the warning to log
    when the caller must switch to resuming (``action``: how it says so), None when it is no restart, resumes
    anyway or nothing is saved."""
    out_dir = Path(out_dir).resolve()
    if resumes or not restart_count() or not has_saved_state(out_dir):
        return None
    return (f"SLURM job {os.environ.get('SLURM_JOB_ID')} restart {restart_count()}: {action} {out_dir} "
            f"instead of {first_start} of the first start")
