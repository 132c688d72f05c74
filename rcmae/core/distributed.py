"""Process-group set-up from torchrun or SLURM variables; a single process needs neither."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_variables(env: dict[str, str] | None = None) -> tuple[DistEnv, dict[str, str]]:
    """Rank layout from torchrun (``RANK``...) or, failing that, SLURM (``SLURM_PROCID``...).

    Returns the layout and the variables the ``env://`` rendezvous still needs.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))), {}
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        layout = DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)))
        extra = {"MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(env),
                 "MASTER_PORT": env.get("MASTER_PORT")
                 or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)}
        return layout, extra
    return DistEnv(), {}


def _first_slurm_host(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: set MASTER_ADDR")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()[0]


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group described by the environment (no-op for one process)."""
    layout, extra = env_from_variables()
    if layout.world_size == 1:
        return layout
    os.environ.update(extra)
    os.environ.setdefault("RANK", str(layout.rank))
    os.environ.setdefault("WORLD_SIZE", str(layout.world_size))
    os.environ.setdefault("LOCAL_RANK", str(layout.local_rank))
    if device_type == "cuda":
        torch.cuda.set_device(layout.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return layout


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


_control_group = None


def control_group():
    """A gloo group for small CPU tensors (control decisions taken every step): under NCCL they would
    cost a host-device round trip. The default group when it is gloo already."""
    global _control_group
    if dist.get_backend() == "gloo":
        return None
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")
    return _control_group


def all_gather_objects(obj) -> list:
    if world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
