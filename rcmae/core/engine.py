"""The training frame: the step (shared with the throughput benchmark), the hooks, the event storage and
the loop every trainer runs (:class:`TrainerBase`; the jobs' trainers build on
:class:`rcmae.core.trainer.DefaultTrainer`)."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from rcmae.core.optim import LR_SCALE
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
    group's lr is ``lr * group.get(LR_SCALE, 1)`` (the :mod:`rcmae.core.optim` contract: layer-wise
    decay). Returns device tensors summed over micro-batches; nothing here synchronises with the host.
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
            group["lr"] = lr * group.get(LR_SCALE, 1.0)
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


class EventStorage:
    """What the steps leave for the hooks and the run's summary (detectron2's ``EventStorage``): the latest
    value of each named quantity (the step's ``lr``, the last logged ``record``, an evaluation's result, ...).
    Hooks read it instead of sharing variables with the trainer."""

    def __init__(self):
        self.latest: dict = {}

    def put(self, **values) -> None:
        self.latest.update(values)

    def get(self, name: str, default=None):
        return self.latest.get(name, default)


class HookBase:
    """Work around the training loop (detectron2's ``HookBase``): override what you need. ``trainer`` is
    set when the hook is registered; a hook reads its state and :class:`EventStorage` there."""

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass  # nothing by default

    def before_step(self) -> None:
        pass  # nothing by default

    def after_step(self) -> None:
        pass  # nothing by default

    def after_train(self) -> None:
        pass  # nothing by default


class PeriodicHook(HookBase):
    """``action(trainer)`` after every step at which ``due(trainer)`` holds."""

    def __init__(self, due, action):
        self.due, self.action = due, action

    def after_step(self) -> None:
        if self.due(self.trainer):
            self.action(self.trainer)


class FinallyHook(HookBase):
    """``action(trainer)`` once when training ends, however it ends (close files, bars)."""

    def __init__(self, action):
        self.action = action

    def after_train(self) -> None:
        self.action(self.trainer)


class TrainerBase:
    """The loop every trainer shares (detectron2's ``TrainerBase``): for optimizer steps ``start`` to
    ``stop``, every hook's ``before_step``, :meth:`run_step`, then every hook's ``after_step``, in the
    order the hooks were registered (logging before checkpointing, ...); ``before_train`` and
    ``after_train`` around it all (``after_train`` however the loop ends). ``step`` counts the finished
    steps; ``epoch`` and ``epoch_end`` follow from it.

    After each step every rank asks whether a job-control signal came (:mod:`rcmae.core.preemption`);
    if so ``interrupted`` holds it while the hooks run (a checkpoint hook saves then), and the loop
    raises :class:`Interrupted`."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.step = self.stop = 0
        self.interrupted: int | None = None
        self.hooks: list[HookBase] = []
        self.storage = EventStorage()

    def register_hooks(self, hooks: list[HookBase | None]) -> None:
        """Append ``hooks`` (None entries, hooks switched off by the config, are skipped) in their order."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

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

    def train(self, start: int, stop: int) -> int:
        """Run steps ``start`` to ``stop``; returns the number of finished steps."""
        self.step, self.stop = start, stop
        try:
            self.before_train()
            while self.step < self.stop:
                self.before_step()
                self.run_step()
                self.step += 1
                self.interrupted = stop_requested()
                self.after_step()
                if self.interrupted is not None:
                    stop = Interrupted(self.interrupted, f"step {self.step} of {self.stop}")
                    log.warning("%s: state saved", stop)
                    raise stop
        finally:
            self.after_train()
        return self.step

    def call_hooks(self, event: str) -> None:
        """Every hook's ``event`` method, in registration order."""
        for hook in self.hooks:
            getattr(hook, event)()

    def before_train(self) -> None:
        self.call_hooks("before_train")

    def before_step(self) -> None:
        self.call_hooks("before_step")

    def after_step(self) -> None:
        self.call_hooks("after_step")

    def after_train(self) -> None:
        self.call_hooks("after_train")

    def run_step(self) -> None:
        """Optimizer step ``self.step`` (0-based; ``step`` counts it once it returns)."""
        raise NotImplementedError
