"""What every training and evaluation tool shares: process set-up, precision, logging, RNG state,
metric logging with one host sync every few steps, and the non-finite-loss stop."""
from __future__ import annotations

import json
import logging
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rcmae.core.config import flatten, save_config
from rcmae.core.distributed import DistEnv, all_reduce, barrier, init_distributed, world_size
from rcmae.core.errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def accumulation_steps(batch_size: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation that keeps the effective batch ``batch_size`` on ``world`` processes."""
    per_step = micro_batch * world
    if batch_size % per_step:
        raise ConfigError(f"optim.batch_size={batch_size} must be a multiple of "
                          f"train.micro_batch ({micro_batch}) x processes ({world}) = {per_step}")
    return batch_size // per_step


def resolve_precision(precision: str, device_type: str) -> tuple[str, torch.dtype | None]:
    """``auto`` is bf16 on GPU and fp32 on CPU; fp32 matmuls may use TF32 on GPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return precision, AMP_DTYPES[precision]


def interactive() -> bool:
    """Progress bars only on a terminal: in a SLURM log their carriage returns pile up."""
    return sys.stdout.isatty()


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stdout, off on other ranks (``disable``) and when stdout is not a terminal."""
    kwargs["disable"] = kwargs.get("disable", False) or not interactive()
    return tqdm(file=sys.stdout, dynamic_ncols=True, mininterval=1.0, **kwargs)


class ProgressAwareHandler(logging.StreamHandler):
    """Log lines to stdout through ``tqdm.write``, so they print above a running bar, not over it."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


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


def rng_state() -> dict:
    """RNG states in plain types, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                      float(gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def warn_config_changes(saved: dict, cfg: dict) -> None:
    """Resuming with another recipe is allowed (e.g. more epochs) but never silent."""
    old, new = flatten(saved), flatten(cfg)
    changed = {k: (old.get(k), new[k]) for k in new
               if old.get(k) != new[k] and not k.startswith(("train.", "log.", "checkpoint."))}
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's: %s",
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


class MetricLogger:
    """Accumulates step metrics on the device and reduces them every few steps (one host sync)."""

    NO_BAD_STEP = 2 ** 62

    def __init__(self, device, out_dir: Path | None, tensorboard: bool, log_grad_norm: bool,
                 keys=("loss",), prefix: str = "train"):
        self.device, self.log_grad_norm, self.prefix = device, log_grad_norm, prefix
        self.keys = (*keys, "grad_norm")  # grad_norm: with optim.clip_grad only
        self.jsonl = open(out_dir / "metrics.jsonl", "a") if out_dir else None
        self.tb = None
        if tensorboard and out_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(out_dir / "tensorboard")
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
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{self.prefix}/{k}", v, record["step"])

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def run_record(env: DistEnv) -> dict:
    """What reproduces a run beside its config: the command line, the code's git commit (when it runs
    from a checkout) and the versions of what it runs on."""
    import importlib.metadata
    import platform
    import subprocess

    import rcmae

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=Path(rcmae.__file__).parent, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    versions = {"python": platform.python_version(), "rcmae": rcmae.__version__}
    for name in ("torch", "torchvision", "timm", "detectron2", "submitit"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed: not listed
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "cwd": os.getcwd(),
            "host": platform.node(), "world_size": env.world_size,
            "git": {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
            if commit else None,
            "versions": versions, "cuda": torch.version.cuda if torch.cuda.is_available() else None}


@dataclass
class Run:
    env: DistEnv
    device: torch.device
    out_dir: Path
    precision: str
    amp_dtype: torch.dtype | None


def start_run(cfg: dict) -> Run:
    """Join the process group, pick the device and precision, prepare the output directory
    (stale temporary files removed, logging, resolved config saved)."""
    t = cfg["train"]
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if t["device"] == "auto" else t["device"]
    env = init_distributed(device_type)
    device = torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device("cpu")
    out_dir = Path(t["output_dir"]).resolve()
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.tmp"):  # half-written files of an interrupted save
            stale.unlink()
    barrier()
    setup_logging(out_dir, env.is_main)
    if env.is_main:
        save_config(cfg, out_dir / "config.yaml")
        with open(out_dir / "runs.jsonl", "a") as f:  # one line per start (and per resume)
            f.write(json.dumps(run_record(env)) + "\n")
    return Run(env, device, out_dir, *resolve_precision(t["precision"], device_type))
