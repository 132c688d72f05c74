"""The training step shared by the training loop and the throughput benchmark."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from rcmae.core.preemption import Interrupted, stop_requested

log = logging.getLogger(__name__)


def training_forward(module: nn.Module, world_size: int, device: torch.device, compile: bool) -> nn.Module:
    """What the step calls: ``module`` under DDP when there are several processes, then compiled
    on request (``torch.compile``)."""
    forward = module
    if world_size > 1:
        forward = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile else forward


class TrainStep:
    """One optimizer step: ``accum`` micro-batches forward/backward (DDP syncs on the last only),
    optional gradient clipping, optimizer step (through the fp16 scaler when given), then
    ``on_update(arg)`` for each of ``update_args``: the last after the optimizer step, any others
    after micro-batches 0, 1, ... (e.g. an EMA that follows the weights, per step or per micro-batch).

    ``forward(*inputs)`` returns a dict with the ``loss`` to minimise and detached metrics. Each
    group's lr is ``lr * group.get("lr_scale", 1)`` (layer-wise decay). Returns device tensors
    summed over micro-batches; nothing here synchronises with the host.
    """

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 amp_dtype: torch.dtype | None, device: torch.device, clip_grad: float | None = None,
                 scaler: torch.amp.GradScaler | None = None, on_update=None, metric_keys=("loss",)):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.amp_dtype, self.device, self.clip_grad, self.scaler = amp_dtype, device, clip_grad, scaler
        self.on_update = on_update
        self.metric_keys = metric_keys

    def __call__(self, micro_batches: list[tuple[torch.Tensor, ...]], lr: float,
                 update_args: tuple | list = ()) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        accum = len(micro_batches)
        if len(update_args) > accum:
            raise ValueError(f"{len(update_args)} updates for {accum} micro-batches")
        between = update_args[:-1]  # updates after micro-batches, before the optimizer step
        sums = {}
        for i, inputs in enumerate(micro_batches):
            sync = i == accum - 1 or not hasattr(self.forward, "no_sync")
            with (contextlib.nullcontext() if sync else self.forward.no_sync()), \
                    torch.autocast(self.device.type, dtype=self.amp_dtype,
                                   enabled=self.amp_dtype is not None):
                out = self.forward(*inputs)
            loss = out["loss"] / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key in self.metric_keys:
                if key in out:
                    value = out[key].detach()
                    sums[key] = sums[key] + value if key in sums else value
            if i < len(between) and self.on_update is not None:
                self.on_update(between[i])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if update_args and self.on_update is not None:
            self.on_update(update_args[-1])
        return sums


class HookBase:
    """Periodic work around the training loop (detectron2's ``HookBase``): override what you need."""

    def after_step(self, loop: "TrainLoop") -> None:
        pass  # nothing by default

    def after_train(self, loop: "TrainLoop") -> None:
        pass  # nothing by default


class PeriodicHook(HookBase):
    """``action(loop)`` after every step at which ``due(loop)`` holds."""

    def __init__(self, due, action):
        self.due, self.action = due, action

    def after_step(self, loop: "TrainLoop") -> None:
        if self.due(loop):
            self.action(loop)


class FinallyHook(HookBase):
    """``action(loop)`` once when the loop ends, however it ends (close files, bars)."""

    def __init__(self, action):
        self.action = action

    def after_train(self, loop: "TrainLoop") -> None:
        self.action(loop)


class TrainLoop:
    """The loop skeleton every trainer shares: ``run_step(step)`` for optimizer steps ``start`` to
    ``stop``, then every hook's ``after_step`` in order (logging before checkpointing, ...). ``step``
    counts the finished steps; ``epoch`` and ``epoch_end`` follow from it.

    After each step every rank asks whether a job-control signal came (:mod:`rcmae.core.preemption`);
    if so ``interrupted`` holds it while the hooks run (a trainer's checkpoint hook saves then), and
    the loop raises :class:`Interrupted`."""

    def __init__(self, run_step, start: int, stop: int, steps_per_epoch: int, hooks: list[HookBase]):
        self.run_step, self.step, self.stop = run_step, start, stop
        self.steps_per_epoch, self.hooks = steps_per_epoch, hooks
        self.interrupted: int | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def epoch_end(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def every_steps(self, n: int) -> bool:
        return bool(n) and self.step % n == 0

    def every_epochs(self, n: int) -> bool:
        return bool(n) and self.epoch_end and self.epoch % n == 0

    def run(self) -> int:
        try:
            while self.step < self.stop:
                self.run_step(self.step)
                self.step += 1
                self.interrupted = stop_requested()
                for hook in self.hooks:
                    hook.after_step(self)
                if self.interrupted is not None:
                    stop = Interrupted(self.interrupted, f"step {self.step} of {self.stop}")
                    log.warning("%s: state saved", stop)
                    raise stop
        finally:
            for hook in self.hooks:
                hook.after_train(self)
        return self.step
