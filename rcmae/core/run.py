"""What every training and evaluation tool shares: process set-up, precision, logging, RNG state,
metric logging with one host sync every few steps, and the non-finite-loss stop."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import resource
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import torch
import torch.distributed as dist

from rcmae.core.checkpoint import find_last_checkpoint
from rcmae.core.config import flatten, save_config
from rcmae.core.distributed import DistEnv, all_gather_objects, all_reduce, init_distributed, world_size
from rcmae.core.errors import ConfigError, NonFiniteLossError, OutputDirInUseError
from rcmae.core.preemption import restart_count, resume_on_restart
from rcmae.core.progress import ProgressAwareHandler

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def accumulation_steps(batch_size: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation that keeps the effective batch ``batch_size`` on ``world`` processes."""
    check_counts({"optim.batch_size": batch_size, "train.micro_batch": micro_batch})
    per_step = micro_batch * world
    if batch_size % per_step:
        raise ConfigError(f"optim.batch_size={batch_size} must be a multiple of "
                          f"train.micro_batch ({micro_batch}) x processes ({world}) = {per_step}")
    return batch_size // per_step


# The smallest value a run can use, by key name (the last part of the key, in any section); a value below
# it would surface as a division by zero, an empty schedule or a loader error after the run has started.
AT_LEAST_ONE = ("batch_size", "micro_batch", "epochs", "trials", "synthetic_size", "heldout_images")
AT_LEAST_ZERO = ("warmup_epochs", "every_epochs", "every_steps", "probe_every_steps", "keep", "recon_images",
                 "lr", "base_lr", "min_lr", "weight_decay", "clip_grad", "stop_at_step", "drop_path", "smoothing",
                 "mixup", "cutmix", "reprob", "gamma", "head_init_std")
FRACTIONS = ("momentum", "layer_decay", "crop_pct", "crop_min_scale")  # in (0, 1]
INTEGERS = ("stop_at_step", "img_size")  # None by default in some tools, so the config's types do not check them


def check_counts(cfg: dict) -> None:
    """The numbers of a config, in any section: batch sizes, epochs and other counts are positive, worker
    counts, rates, intervals and weights 0 or more, momenta and crop fractions in (0, 1], and a number where a
    key's default is None (``optim.lr``, ``optim.clip_grad``, ``train.stop_at_step``, ``data.crop_pct``)."""
    for key, value in flatten(cfg).items():
        leaf = key.rsplit(".", 1)[-1]
        if value is None or not leaf.endswith((*AT_LEAST_ONE, *AT_LEAST_ZERO, *FRACTIONS, *INTEGERS, "num_workers")):
            continue
        if leaf in INTEGERS and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if leaf.endswith(("batch_size", "micro_batch")) and value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value}")
        if leaf == "num_workers" and value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value} (0 reads the data in the training process)")
        if leaf in AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{key} must be 1 or more, got {value}")
        if leaf in AT_LEAST_ZERO and value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
        if leaf in FRACTIONS and not 0 < value <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {value}")


def check_output_dir(out_dir: str | Path, key: str = "train.output_dir") -> None:
    """The output directory is a directory, or can be created as one, and is writable: checked before
    anything is written, so a bad path fails with its name instead of half a run set-up."""
    path = Path(out_dir).resolve()
    existing = path
    while not existing.exists():  # the nearest existing ancestor is where mkdir would write
        existing = existing.parent
    if not existing.is_dir():
        what = "" if existing == path else f" cannot be created: {existing}"
        raise ConfigError(f"{key}={out_dir}{what} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={out_dir}: {existing} is not writable (permissions or a read-only file "
                          "system); choose another output directory")


DEVICES = ("auto", "cpu", "cuda")


def check_run_config(cfg: dict) -> None:
    """What every tool's run needs from its config, checked before any work: the counts
    (:func:`check_counts`), ``train.device`` and ``train.precision``, and the output directory
    (:func:`check_output_dir`). The command line (:func:`rcmae.core.launcher.run_cli`) calls it, with
    the tool's own checks, before it runs, writes or submits anything, whatever the launch;
    :func:`start_run` again, for a ``main`` called from Python."""
    check_counts(cfg)
    t = cfg["train"]
    if t.get("device", "auto") not in DEVICES:
        raise ConfigError(f"train.device must be one of {DEVICES}, got {t['device']!r} (cuda: one GPU per "
                          "process, the process's LOCAL_RANK)")
    if t.get("precision", "auto") not in ("auto", *AMP_DTYPES):
        raise ConfigError(f"train.precision must be one of {('auto', *AMP_DTYPES)}, got {t['precision']!r}")
    check_output_dir(t["output_dir"])


LOCK_FILE = "run.lock"
_held_output_dirs: dict[Path, IO[str]] = {}  # output dir -> its open lock file, for this process


def lock_output_dir(out_dir: Path) -> None:
    """Make this process the only run in ``out_dir``: an exclusive ``flock`` on ``out_dir/run.lock``,
    which names the holder (host, pid, start time, command). The kernel drops the lock when the holder
    exits or dies, so a crashed run's lock file is simply taken over. Re-entrant within a process (a
    main may run twice in one process); :func:`release_output_dirs` lets go."""
    out_dir = Path(out_dir).resolve()
    if out_dir in _held_output_dirs:
        return
    lock = open(out_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder_text = lock.read()
        lock.close()
        try:
            holder = json.loads(holder_text)
            who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}, command: "
                   f"{' '.join(holder['argv'])}")
        except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its name
            who = "a process that is just starting"
        raise OutputDirInUseError(
            f"{out_dir} is in use by another run ({who}). Two runs in one output directory would overwrite "
            "each other's checkpoints and metrics: wait for that run to end, stop it, or set another "
            "train.output_dir.") from None
    except OSError as e:  # a file system without locks: run, but say that nothing guards the directory
        log.warning("cannot lock %s (%s): a second run started in this directory would not be stopped",
                    out_dir / LOCK_FILE, e)
    lock.seek(0)
    lock.truncate()
    holder = {"host": platform.node(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv}
    lock.write(json.dumps(holder) + "\n")
    lock.flush()
    _held_output_dirs[out_dir] = lock


def release_output_dirs() -> None:
    """Let go of every output directory this process locked (the end of a run, or of the process)."""
    while _held_output_dirs:
        _, lock = _held_output_dirs.popitem()
        lock.close()  # closing the file drops its flock


def resolve_precision(precision: str, device_type: str) -> tuple[str, torch.dtype | None]:
    """``auto`` is bf16 on GPU and fp32 on CPU; fp32 matmuls may use TF32 on GPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return precision, AMP_DTYPES[precision]


def setup_logging(out_dir: Path, is_main: bool) -> None:
    """Log this project (the ``rcmae`` logger and its children) to stdout and (rank 0) ``log.txt``;
    other loggers are left alone."""
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    handlers = [ProgressAwareHandler()]
    if is_main:
        handlers.append(logging.FileHandler(out_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
    logger = logging.getLogger("rcmae")
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)


class MetricLogger:
    """Accumulates step metrics on the device and reduces them every few steps (one host sync)."""

    NO_BAD_STEP = 2 ** 62

    def __init__(self, device, out_dir: Path | None, cfg: dict, log_grad_norm: bool, keys=("loss",),
                 prefix: str = "train"):
        """``out_dir`` None: not the main process (nothing written). ``cfg["log"]`` switches on
        TensorBoard (``tensorboard``) and Weights & Biases (``wandb``: offline / online)."""
        self.device, self.log_grad_norm, self.prefix = device, log_grad_norm, prefix
        self.keys = (*keys, "grad_norm")  # grad_norm: with optim.clip_grad only
        self.jsonl = open(out_dir / "metrics.jsonl", "a") if out_dir else None
        self.tb = self.wandb = None
        if cfg["log"]["tensorboard"] and out_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(out_dir / "tensorboard")
        if cfg["log"]["wandb"] != "none" and out_dir:
            self.wandb = wandb_run(cfg, out_dir)
        self._reset()

    def _reset(self):
        self.sums = torch.zeros(len(self.keys), device=self.device)
        self.first_bad = torch.full((), self.NO_BAD_STEP, dtype=torch.long, device=self.device)
        self.steps, self.skipped, self.images, self.data_wait, self.t0 = 0, 0, 0, 0.0, time.perf_counter()

    def add(self, step: int, sums: dict, micro_steps: int, skipped: int, images: int, data_wait: float = 0.0):
        zero = torch.zeros((), device=self.device)
        row = torch.stack([sums.get(k, zero) / (1 if k == "grad_norm" else micro_steps)
                           for k in self.keys])
        self.sums += row
        # remember the first non-finite step without asking the device (no sync)
        self.first_bad = torch.minimum(
            self.first_bad, torch.where(torch.isfinite(row[0]), self.NO_BAD_STEP, step))
        self.steps += 1
        self.skipped += skipped
        self.images += images
        self.data_wait += data_wait

    def flush(self, step: int, epoch: float, is_main: bool, **scalars: float) -> dict:
        """Reduce over processes; raise if a loss was not finite; write the log line (with the
        caller's ``scalars``, e.g. the lr)."""
        world = world_size()
        totals = all_reduce(torch.cat([self.sums, torch.tensor(
            [self.steps, self.skipped], dtype=torch.float32, device=self.device)]))
        first_bad = int(all_reduce(self.first_bad.clone(), dist.ReduceOp.MIN).item())
        if first_bad < self.NO_BAD_STEP:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {first_bad} (global step, 0-based): stopping. "
                "The last checkpoint holds the last good weights; lower the learning rate, "
                "enable optim.clip_grad or use train.precision=bf16.")
        values = totals.tolist()
        steps = max(values[-2], 1)  # steps x processes
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "epoch": round(epoch, 4), **scalars}
        record.update({k: v / steps for k, v in zip(self.keys, values)
                       if k != "grad_norm" or self.log_grad_norm})
        record["skipped_images"] = int(values[-1])
        record["img_per_s"] = self.images * world / elapsed if elapsed > 0 else 0.0
        # wall clock, the mean step, and the share of it spent waiting for data (this process)
        record["time"] = round(time.time(), 3)
        record["step_s"] = elapsed / max(self.steps, 1)
        record["data_s"] = self.data_wait / max(self.steps, 1)
        record["data_wait_frac"] = self.data_wait / elapsed if elapsed > 0 else 0.0
        record["mem_gb"] = (torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        self.write(record, is_main)
        self._reset()
        return record

    def write(self, record: dict, is_main: bool) -> None:
        """One JSON line (and TensorBoard scalars) on the main process."""
        if not (is_main and self.jsonl):
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {f"{self.prefix}/{k}": v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log({"step": record["step"], **scalars})

    def close(self):
        for sink in (self.jsonl, self.tb):
            if sink:
                sink.close()
        if self.wandb:
            self.wandb.finish()


WANDB_MODES = ("none", "offline", "online")


def check_loggers(log_cfg: dict) -> None:
    """Fail before any work when ``log.wandb`` is wrong or Weights & Biases is not installed."""
    if log_cfg["wandb"] not in WANDB_MODES:
        raise ConfigError(f"log.wandb must be one of {WANDB_MODES}, got {log_cfg['wandb']!r}")
    if log_cfg["wandb"] != "none":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"log.wandb={log_cfg['wandb']} needs Weights & Biases: "
                              "pip install 'rcmae-toolkit[wandb]' (or set log.wandb=none)") from None


def wandb_run(cfg: dict, out_dir: Path):
    """A W&B run for this output directory: its id is kept in ``wandb_id`` there, so a resumed or
    requeued run continues the same W&B run. Offline runs land in ``<out_dir>/wandb/`` for
    ``wandb sync``. Our ``step`` is the x axis (a resume may log a step again)."""
    import wandb

    id_file = out_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    log_cfg = cfg["log"]
    run = wandb.init(project=log_cfg["wandb_project"], name=out_dir.name, id=run_id, resume="allow",
                     dir=out_dir, mode=log_cfg["wandb"], config=cfg)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def run_record(env: DistEnv) -> dict:
    """What reproduces a run beside its config: the command line, the code's git commit (when it runs
    from a checkout) and the versions of what it runs on."""
    import importlib.metadata
    import subprocess

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    versions = {"python": platform.python_version()}
    for key, dist_name in (("rcmae", "rcmae-toolkit"), ("torch", "torch"), ("torchvision", "torchvision"),
                           ("timm", "timm"), ("detectron2", "detectron2"), ("submitit", "submitit")):
        try:
            versions[key] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed: not listed
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "cwd": os.getcwd(),
            "host": platform.node(), "world_size": env.world_size,
            "git": {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
            if commit else None,
            "versions": versions, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            **slurm_record()}


def slurm_record() -> dict:
    """The SLURM job a run belongs to, and how often SLURM restarted it (nothing outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm": {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": restart_count(),
                      "nodes": os.environ.get("SLURM_JOB_NODELIST"), "ntasks": os.environ.get("SLURM_NTASKS")}}


@dataclass
class Run:
    env: DistEnv
    device: torch.device
    out_dir: Path
    precision: str
    amp_dtype: torch.dtype | None


def claim_output_dir(out_dir: Path) -> None:
    """Create ``out_dir``, lock it (:func:`lock_output_dir`), then remove half-written files of an
    interrupted save: only once the lock is held, since another live run's ``*.tmp`` is its checkpoint
    being written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_output_dir(out_dir)
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()


def has_checkpoint(out_dir: Path) -> bool:
    return find_last_checkpoint(out_dir) is not None


def start_run(cfg: dict, validate: Callable[[dict, int], object] | None = None,
              has_saved_state: Callable[[Path], bool] = has_checkpoint) -> Run:
    """Check the config (:func:`check_run_config`, then the tool's ``validate(cfg, world_size)``), join
    the process group, pick the device and precision, and only then prepare the output directory
    (created and locked by the main process, stale temporary files removed, logging, resolved config
    saved): a config that fails its checks leaves nothing behind.

    A job SLURM restarted (requeue, preemption, node failure) continues from what its output directory
    holds (``has_saved_state``) whatever ``train.resume`` said: SLURM reruns the first command line,
    and ``--no-resume`` or ``--resume PATH`` there would throw away the steps done since."""
    check_run_config(cfg)
    t = cfg["train"]
    restarted = resume_on_restart(t["output_dir"], t.get("resume", "auto") == "auto", has_saved_state,
                                  f"train.resume={t.get('resume')!r}")
    if restarted:
        t["resume"] = "auto"
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if t["device"] == "auto" else t["device"]
    env = init_distributed(device_type)
    if validate is not None:
        validate(cfg, env.world_size)
    device = torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device("cpu")
    out_dir = Path(t["output_dir"]).resolve()
    refusal = None
    if env.is_main:
        try:
            claim_output_dir(out_dir)
        except (OutputDirInUseError, OSError) as e:
            refusal = e
    refusal = all_gather_objects(refusal)[0]  # the other processes wait here, and stop with the main one
    if refusal is not None:
        raise refusal
    setup_logging(out_dir, env.is_main)
    if restarted:
        log.warning(restarted)
    if env.is_main:
        save_config(cfg, out_dir / "config.yaml")
        with open(out_dir / "runs.jsonl", "a") as f:  # one line per start (and per resume)
            f.write(json.dumps(run_record(env)) + "\n")
    return Run(env, device, out_dir, *resolve_precision(t["precision"], device_type))
