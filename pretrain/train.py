"""RC-MAE / MAE pretraining: ``main(cfg)`` runs on one CPU process, torchrun, or SLURM tasks."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import default_collate

from rcmae.core import checkpoint as ckpt
from rcmae.core.data.datasets import labelled_eval_sets, pretrain_dataset
from rcmae.core.data.folder import image_folder_classes
from rcmae.core.data.pipelines import PIPELINES, collate_for, model_input
from rcmae.core.data.readers import check_folder_pair
from rcmae.core.data.shards import is_shard_dir
from rcmae.core.distributed import barrier
from rcmae.core.engine import PeriodicHook
from rcmae.core.errors import ConfigError
from rcmae.core.knn import check_knn, knn_evaluate
from rcmae.core.optim import build_pretrain_optimizer, pretrain_param_groups
from rcmae.core.run import accumulation_steps, check_loggers, start_run
from rcmae.core.trainer import DefaultTrainer
from rcmae.core.vit import check_arch
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.probe import TrainingProbe
from rcmae.pretrain.rcmae import (
    METRICS,
    MOMENTUM_SCHEDULES,
    RCMAE,
    TEACHER_MASKS,
    StepSchedules,
    mask_noise,
    official_micro_batches,
)
from rcmae.pretrain.visualize import save_reconstruction

log = logging.getLogger(__name__)


def validate(cfg: dict, world: int) -> int:
    """Check a config for ``world`` processes (key combinations, data folders, checkpoint files)
    before any work; returns the gradient-accumulation factor."""
    m, o, t = cfg["model"], cfg["optim"], cfg["train"]
    check_arch(m["arch"], m["img_size"])
    check_loggers(cfg["log"])
    if not 0 < m["mask_ratio"] < 1:
        raise ConfigError(f"model.mask_ratio must be in (0, 1), got {m['mask_ratio']}")
    d = cfg["data"]
    if d["pipeline"] not in PIPELINES:
        raise ConfigError(f"data.pipeline must be one of {PIPELINES}, got {d['pipeline']!r}")
    if d["source"] not in ("folder", "shards", "demo", "synthetic"):
        raise ConfigError("data.source must be folder, shards, demo or synthetic")
    if d["source"] in ("folder", "shards"):
        if not d["path"]:
            raise ConfigError(f"data.source={d['source']} needs data.path (an ImageFolder tree, e.g. imagenet/train, "
                              "or a folder of shards written by tools/make_shards.py)")
        if d["source"] == "folder":
            image_folder_classes(d["path"], "data.path")
        elif not is_shard_dir(d["path"]):
            raise ConfigError(f"data.path={d['path']} holds no shard index (index.json): write the shards with "
                              "tools/make_shards.py, or use data.source=folder")
    elif d["path"]:
        raise ConfigError(f"data.source={d['source']} makes its own images and would ignore data.path={d['path']}: "
                          "drop --demo / data.source (the default is folder) to train on that folder")
    knn = cfg["knn"]
    if knn["every_epochs"]:
        check_folder_pair(knn, "knn")
        check_knn(knn, "knn")
    ckpt.check_checkpoint_option("train.init", t["init"])
    ckpt.check_checkpoint_option("train.resume", t["resume"])
    if cfg["rcmae"]["teacher_mask"] not in TEACHER_MASKS:
        raise ConfigError(f"rcmae.teacher_mask must be one of {TEACHER_MASKS}, got {cfg['rcmae']['teacher_mask']!r}")
    if cfg["rcmae"]["momentum_schedule"] not in MOMENTUM_SCHEDULES:
        raise ConfigError(f"rcmae.momentum_schedule must be one of {MOMENTUM_SCHEDULES}, "
                          f"got {cfg['rcmae']['momentum_schedule']!r}")
    if cfg["export"]["which"] not in ("teacher", "student"):
        raise ConfigError("export.which must be teacher or student")
    if cfg["analysis"]["every_steps"] < 0:
        raise ConfigError(f"analysis.every_steps must be >= 0 (0: off), got {cfg['analysis']['every_steps']}")
    if cfg["analysis"]["every_steps"] and cfg["rcmae"]["gamma"] == 0:
        raise ConfigError("analysis.every_steps probes the consistency gradient; rcmae.gamma=0 (MAE) has no teacher")
    if cfg["export"]["which"] == "teacher" and cfg["rcmae"]["gamma"] == 0:
        raise ConfigError("rcmae.gamma=0 trains no teacher: set export.which=student")
    return accumulation_steps(o["batch_size"], t["micro_batch"], world)


def load_models(model: RCMAE, c: ckpt.PretrainCheckpoint, what: str, **strict) -> None:
    """Student and teacher (the student's weights where the file has no teacher)."""
    ckpt.load_state(model.student, c.student, f"{what} student", recompute=ckpt.FIXED_KEYS, **strict)
    if model.teacher is not None:
        ckpt.load_state(model.teacher, c.teacher if c.teacher is not None else c.student,
                        f"{what} teacher" if c.teacher is not None else f"{what} student (as teacher)",
                        recompute=ckpt.FIXED_KEYS, **strict)


def knn_datasets(cfg: dict, out_dir: Path, is_main: bool):
    """The labelled train / val pair of the k-NN monitor (None when it is off)."""
    knn = cfg["knn"]
    if not knn["every_epochs"]:
        return None
    return labelled_eval_sets(knn, out_dir, is_main, cfg["model"]["img_size"], "knn", "knn_demo_data")


def knn_monitor(model: RCMAE, sets, cfg: dict, run) -> dict:
    """k-NN accuracy of the teacher's encoder (the student's for MAE), all processes taking part."""
    return knn_evaluate(model.encoder().to(run.device), *sets, run.device, run.amp_dtype, cfg["knn"],
                        run.env.world_size, run.env.rank, cfg["data"]["num_workers"])


class PretrainTrainer(DefaultTrainer):
    """RC-MAE / MAE pretraining on the frame of :class:`~rcmae.core.trainer.DefaultTrainer`: the student
    (and its EMA teacher) on the ``data.pipeline`` stream, one shared mask per step, the teacher moved by
    the ``rcmae.momentum_schedule``; hooks: the gradient probe, metrics, checkpoint, k-NN monitor,
    reconstruction figure."""

    metric_keys = METRICS
    metrics_prefix = "pretrain"

    def __init__(self, cfg: dict, run):
        super().__init__(cfg, run)
        self.recon_inputs = reconstruction_inputs(self)

    def build_train_set(self):
        d = self.cfg["data"]
        if d["pipeline"] == "gpu" and self.device.type != "cuda":
            log.warning("data.pipeline=gpu decodes with nvJPEG and needs CUDA; on %s this run uses the fast CPU "
                        "pipeline instead (the same crops and flips for the same seed)", self.device.type)
            d["pipeline"] = "fast"
        self.knn_sets = knn_datasets(self.cfg, self.run.out_dir, self.env.is_main)
        return pretrain_dataset(d, self.cfg["model"]["img_size"], self.run.out_dir, self.env.is_main)

    def build_model(self) -> RCMAE:
        m, r = self.cfg["model"], self.cfg["rcmae"]
        student = build_mae(m["arch"], m["img_size"], m["decoder_dim"], m["decoder_depth"], m["decoder_heads"],
                            m["norm_pix_loss"])
        return RCMAE(student, m["mask_ratio"], r["gamma"], r["teacher_mask"]).to(self.device)

    def build_optimizer(self):
        o = self.cfg["optim"]
        return build_pretrain_optimizer(self.model.student, o["weight_decay"], o["betas"], self.device.type,
                                        o["decay_tokens"])

    def build_schedule(self) -> StepSchedules:
        o, kind = self.cfg["optim"], self.cfg["rcmae"]["momentum_schedule"]
        official = (official_micro_batches(len(self.train_set), self.env.world_size, self.cfg["train"]["micro_batch"])
                    if kind == "official" else None)
        return StepSchedules(kind, self.steps_per_epoch, o["epochs"], self.accum, o["warmup_epochs"], self.peak_lr,
                             o["min_lr"], self.cfg["rcmae"]["momentum"], official)

    def restore(self) -> int:
        """Resume (auto / a file) or initialise from a checkpoint; returns the first step to run."""
        path, model, init = self.resume_path, self.model, self.cfg["train"]["init"]
        if path is not None:
            c = ckpt.read_checkpoint(path)
            log.info("resuming from %s (%s checkpoint)", path, c.source)
            load_models(model, c, str(path))
            if c.source == "ours":
                return self.checkpointer.restore(c.raw, path)
            # official MAE / RC-MAE: the optimizer in the official parameter order, the step from the epoch
            self.checkpointer.restore_optimizer(c.raw, pretrain_param_groups(model.student, 0.0, decay_tokens=True)[1])
            log.info("continuing after the official checkpoint's epoch %d", c.raw["epoch"])
            return (int(c.raw["epoch"]) + 1) * self.steps_per_epoch
        if init:
            c = ckpt.read_checkpoint(init)
            log.info("initialising from %s (%s checkpoint)", init, c.source)
            load_models(model, c, "train.init", may_miss=lambda key: True)
        return 0

    def model_update(self):
        return self.model.update_teacher

    def build_collate(self):
        return collate_for(self.cfg["data"]["pipeline"])

    def build_hooks(self):
        cfg, main = self.cfg, self.env.is_main
        every_probe, every_recon = cfg["analysis"]["every_steps"], cfg["log"]["recon_every_epochs"]
        log_hook, checkpoint_hook, close_hook = self.standard_hooks()
        return [TrainingProbe(self.model, every_probe, self.run.amp_dtype) if every_probe and main else None,
                log_hook, checkpoint_hook,
                PeriodicHook(self.at_epoch_end(cfg["knn"]["every_epochs"]), PretrainTrainer.knn)
                if self.knn_sets else None,
                PeriodicHook(self.at_epoch_end(every_recon), PretrainTrainer.reconstruction)
                if main and every_recon else None,
                close_hook]

    def at_epoch_end(self, every: int):
        """Due every ``every`` epochs and at the end of the run."""
        return lambda trainer: trainer.epoch_end and (trainer.every_epochs(every) or trainer.step == self.total_steps)

    def next_inputs(self) -> list[tuple]:
        t, size, model = self.cfg["train"], self.cfg["model"]["img_size"], self.model
        noise = mask_noise(t["seed"], self.step, self.cfg["optim"]["batch_size"], model.student.num_patches,
                           self.device, model.teacher_mask == "different")
        micro = []
        for k in range(self.accum):
            imgs, _, n_skipped = next(self.batches)
            first = (k * self.env.world_size + self.env.rank) * t["micro_batch"]
            micro.append((model_input(imgs, self.device, size), noise[..., first:first + t["micro_batch"], :]))
            self.skipped += int(n_skipped.sum())  # a CPU tensor: no device sync
        return micro

    def run_step(self) -> None:
        lr, momenta = self.schedule.lr(self.step), self.schedule.momenta(self.step)
        sums = self.train_step(self.inputs, lr, momenta)
        for momentum in self.schedule.leftover_momenta(self.step):  # official: the epoch's leftover micro-batches
            self.model.update_teacher(momentum)
        self.add_metrics(sums)
        self.storage.put(lr=lr, momentum=momenta[-1])

    def logged_scalars(self) -> tuple[str, ...]:
        return ("lr", "momentum")

    def bar_postfix(self, record: dict) -> dict:
        return {**super().bar_postfix(record), "img_s": f"{record['img_per_s']:.0f}"}

    def log_metrics(self) -> dict:
        record = super().log_metrics()
        log.info("step %d/%d %s", self.step, self.total_steps,
                 " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "time")))
        return record

    def save(self) -> None:
        model = self.model
        self.checkpointer.save(self.step, format=ckpt.FORMAT, arch=self.cfg["model"]["arch"],
                               student=model.student.state_dict(),
                               teacher=model.teacher.state_dict() if model.teacher is not None else None)

    def knn(self) -> None:
        result = knn_monitor(self.model, self.knn_sets, self.cfg, self.run)
        self.metrics.write({"step": self.step, "epoch": self.epoch, **result}, self.env.is_main)
        log.info("epoch %d k-NN top-1 %.2f top-5 %.2f", self.epoch, result["knn_top1"], result["knn_top5"])

    def reconstruction(self) -> None:
        fig = save_reconstruction(self.model, *self.recon_inputs,
                                  self.run.out_dir / f"reconstruction_epoch{self.epoch:04d}.png",
                                  f"{self.cfg['model']['arch']} epoch {self.epoch}")
        log.info("reconstruction figure: %s", fig)

    def log_start(self) -> None:
        m, t, o, env = self.cfg["model"], self.cfg["train"], self.cfg["optim"], self.env
        teacher = (f"EMA ({self.cfg['rcmae']['momentum_schedule']} schedule)" if self.model.teacher is not None
                   else "none (MAE)")
        log.info("model %s (%.1fM student params), teacher: %s, %d process(es), micro-batch %d x accum %d "
                 "= batch %d, %d steps/epoch, %d steps in all, peak lr %.3g, precision %s, device %s",
                 m["arch"], sum(p.numel() for p in self.model.student.parameters()) / 1e6, teacher,
                 env.world_size, t["micro_batch"], self.accum, o["batch_size"], self.steps_per_epoch,
                 self.total_steps, self.peak_lr, self.run.precision, self.device)
        if self.schedule.leftover:
            log.info("official schedule: %d micro-batches per process and epoch as in the official loop; the %d "
                     "left after an epoch's last optimizer step update the teacher only (their gradient is "
                     "discarded there)", self.schedule.micro_per_epoch, self.schedule.leftover)


def reconstruction_inputs(trainer: PretrainTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the reconstruction figures (spread over the sorted folders) and their fixed masks."""
    dataset, model, seed = trainer.train_set, trainer.model, trainer.cfg["train"]["seed"]
    size, collate = trainer.cfg["model"]["img_size"], trainer.collate or default_collate
    n = min(trainer.cfg["log"]["recon_images"], len(dataset))
    images = model_input(collate([dataset[(i * len(dataset) // n, i)] for i in range(n)])[0], trainer.device, size)
    noise = mask_noise(seed + 1, 0, n, model.student.num_patches, trainer.device, model.teacher_mask == "different")
    return images, noise


def main(cfg: dict) -> dict:
    """Train; returns a summary (output paths, last metrics). Safe to call again after a requeue."""
    run = start_run(cfg, validate)  # checked before the output directory is touched
    trainer = PretrainTrainer(cfg, run)
    trainer.log_start()
    summary = trainer.fit()
    out_dir, step = run.out_dir, summary["step"]
    summary.update(total_steps=trainer.total_steps, last=trainer.storage.get("record", {}))
    if step >= trainer.total_steps and run.env.is_main:
        which = cfg["export"]["which"]
        encoder = ckpt.export_encoder(summary["checkpoint"], which, out_dir / f"encoder_{which}.pth")
        summary.update(encoder=str(encoder), timm_folder=str(encoder.with_suffix("")))
    figs = sorted(out_dir.glob("reconstruction_epoch*.png"))
    summary["reconstruction"] = str(figs[-1]) if figs else ""
    barrier()
    return summary
