"""The frame of a training job (detectron2's ``DefaultTrainer``): one skeleton, named build points.

:class:`DefaultTrainer` sets up what pretraining, fine-tuning and linear probing share, in this order:
the training set (``build_train_set``), the schedule (``build_schedule``), the model (``build_model``, after seeding
torch so that every rank starts from the same weights), the optimizer (``build_optimizer``), the fp16
scaler, the checkpointer, the restored state (``restore``), the step (``build_forward``), the endless
micro-batch stream from the first step to run, the metric writer, the bar, and the hooks
(``build_hooks``, in the order they run). Each step draws its micro-batches (``next_inputs``) before the
hooks' ``before_step`` (a hook may measure on them), then :meth:`run_step` runs the job's step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from rcmae.core import checkpoint as ckpt
from rcmae.core.data.sampler import train_batches
from rcmae.core.engine import FinallyHook, HookBase, PeriodicHook, TrainerBase, TrainStep, training_forward
from rcmae.core.errors import ConfigError
from rcmae.core.progress import progress
from rcmae.core.run import MetricLogger, Run, accumulation_steps


class DefaultTrainer(TrainerBase):
    """A training job on ``cfg`` (sections ``train``, ``optim``, ``data``, ``checkpoint``, ``log``) and
    ``run`` (:func:`rcmae.core.run.start_run`). Subclasses fill the build points and :meth:`run_step`."""

    metric_keys: tuple[str, ...] = ("loss",)  # what the forward reports each step
    metrics_prefix = "train"  # TensorBoard / W&B namespace

    def __init__(self, cfg: dict, run: Run):
        t, o = cfg["train"], cfg["optim"]
        self.cfg, self.run, self.env, self.device = cfg, run, run.env, run.device
        self.accum = accumulation_steps(o["batch_size"], t["micro_batch"], self.env.world_size)
        self.resume_path = ckpt.resume_path(t["resume"], run.out_dir)
        self.train_set = self.build_train_set()
        steps_per_epoch = len(self.train_set) // o["batch_size"]
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} images cannot fill one batch of "
                              f"optim.batch_size={o['batch_size']}")
        super().__init__(steps_per_epoch)
        self.total_steps = o["epochs"] * steps_per_epoch
        self.peak_lr = o["lr"] if o["lr"] is not None else o["base_lr"] * o["batch_size"] / 256
        self.schedule = self.build_schedule()
        torch.manual_seed(t["seed"])  # identical initial weights on every rank
        self.model = self.build_model()
        self.optimizer, param_names = self.build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if run.precision == "fp16" else None
        self.checkpointer = ckpt.Checkpointer(run.out_dir, cfg["checkpoint"]["keep"], self.optimizer, param_names,
                                              self.scaler, cfg, steps_per_epoch, self.env.rank)
        self.start_step = self.restore()
        self.stop_step = min(self.total_steps, t["stop_at_step"] or self.total_steps)
        forward = training_forward(self.build_forward(), self.env.world_size, self.device, t["compile"])
        self.train_step = TrainStep(self.model, forward, self.optimizer, run.amp_dtype, self.device, o["clip_grad"],
                                    self.scaler, on_update=self.model_update(), metric_keys=self.metric_keys)
        self.collate = self.build_collate()
        self.batches = train_batches(self.train_set, t["micro_batch"], self.accum, self.env.world_size,
                                     self.env.rank, t["seed"], self.start_step, cfg["data"]["num_workers"],
                                     self.device.type == "cuda" and self.collate is None, self.collate)
        self.inputs: list[tuple] = []
        self.metrics = MetricLogger(self.device, run.out_dir if self.env.is_main else None, cfg, bool(o["clip_grad"]),
                                    keys=self.metric_keys, prefix=self.metrics_prefix)
        self.bar = progress(total=self.total_steps, initial=self.start_step, disable=not self.env.is_main,
                            unit="step")
        self.register_hooks(self.build_hooks())

    # ---- build points ----------------------------------------------------------------------------
    def build_train_set(self):
        raise NotImplementedError

    def build_schedule(self):
        """What gives each step's lr (and any other per-step value), from ``steps_per_epoch``,
        ``total_steps`` and ``peak_lr``."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, list[str]]:
        """The optimizer and its parameters' names in group order (:mod:`rcmae.core.optim`)."""
        raise NotImplementedError

    def restore(self) -> int:
        """Load what ``resume_path`` (or an init checkpoint) holds; returns the first step to run."""
        raise NotImplementedError

    def build_forward(self) -> nn.Module:
        """What DDP wraps: returns ``{"loss": ..., <metric_keys>}`` for a micro-batch's inputs."""
        return self.model

    def model_update(self):
        """``TrainStep``'s ``on_update`` (an EMA teacher's update), or None."""
        return None

    def build_collate(self):
        """The loader's ``collate_fn``; None: torch's default (pinned on CUDA)."""
        return None

    def build_hooks(self) -> list[HookBase | None]:
        raise NotImplementedError

    def next_inputs(self) -> list[tuple]:
        """This step's micro-batches, as ``build_forward``'s module takes them."""
        raise NotImplementedError

    # ---- the step and the shared hooks -------------------------------------------------------------
    def before_step(self) -> None:
        self.skipped = 0
        self.inputs = self.next_inputs()
        super().before_step()

    def add_metrics(self, sums: dict) -> None:
        """The step's sums to the metric writer, and one tick of the bar."""
        self.metrics.add(self.step, sums, self.accum, self.skipped, self.accum * self.cfg["train"]["micro_batch"],
                         self.batches.take_wait())
        self.bar.update(1)

    def checkpoint_due(self) -> bool:
        """A stop signal, the run's last step, or a periodic checkpoint (``checkpoint.every_steps`` where the
        config has it, ``checkpoint.every_epochs``)."""
        ck = self.cfg["checkpoint"]
        return (self.interrupted is not None or self.step == self.stop or self.every_steps(ck.get("every_steps", 0))
                or self.every_epochs(ck["every_epochs"]))

    def log_due(self) -> bool:  # with every checkpoint: a non-finite loss stops the run before it saves
        return self.checkpoint_due() or self.every_steps(self.cfg["log"]["every_steps"])

    def log_metrics(self) -> dict:
        """Reduce and write the metrics since the last line, with the step's scalars (``storage``'s ``lr``,
        ...: :meth:`logged_scalars`); the record goes to ``storage`` as ``record``."""
        record = self.metrics.flush(self.step, self.step / self.steps_per_epoch, self.env.is_main,
                                    **{k: self.storage.get(k) for k in self.logged_scalars()})
        self.bar.set_postfix(**self.bar_postfix(record))
        self.storage.put(record=record)
        return record

    def logged_scalars(self) -> tuple[str, ...]:
        return ("lr",)

    def bar_postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4f}", "lr": f"{self.storage.get('lr'):.2e}",
                "data": f"{record['data_wait_frac']:.0%}"}

    def save(self) -> None:
        raise NotImplementedError

    def standard_hooks(self) -> tuple[HookBase, HookBase, HookBase]:
        """Metrics, checkpoint, close, in that order: a job's periodic work (evaluation, figures) goes between
        the checkpoint and the close, a hook that measures the step itself (the gradient probe) before them."""
        return (PeriodicHook(lambda trainer: trainer.log_due(), lambda trainer: trainer.log_metrics()),
                PeriodicHook(lambda trainer: trainer.checkpoint_due(), lambda trainer: trainer.save()),
                FinallyHook(lambda trainer: (trainer.bar.close(), trainer.metrics.close())))

    def fit(self) -> dict:
        """Train from ``start_step`` to ``stop_step``; returns the summary every job reports."""
        step = self.train(self.start_step, self.stop_step)
        return {"output_dir": str(self.run.out_dir), "step": step,
                "checkpoint": str(ckpt.find_last_checkpoint(self.run.out_dir) or ""),
                "metrics": str(self.run.out_dir / "metrics.jsonl")}
