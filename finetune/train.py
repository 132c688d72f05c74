"""Fine-tuning (MAE recipe) and linear probing of ViT backbones: ``main(cfg)``, like pretraining,
runs on one CPU process, torchrun or SLURM tasks, resumes exactly, and evaluates exactly under DDP.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from rcmae.core import checkpoint as ckpt
from rcmae.core.data.datasets import SeededImages, eval_dataset
from rcmae.core.data.readers import check_folder_pair, labelled_images, labelled_pair
from rcmae.core.data.sampler import sample_seed, seeded, shard_loader
from rcmae.core.data.transforms import classifier_train_transform as train_transform
from rcmae.core.distributed import barrier
from rcmae.core.engine import PeriodicHook
from rcmae.core.errors import ConfigError
from rcmae.core.evaluate import evaluate
from rcmae.core.optim import FINETUNE_OPTIMIZERS, build_finetune_optimizer
from rcmae.core.optim import param_names as optim_param_names
from rcmae.core.run import accumulation_steps, check_loggers, start_run
from rcmae.core.schedules import lr_at
from rcmae.core.trainer import DefaultTrainer
from rcmae.core.vit import GLOBAL_POOLS, build_classifier, check_arch
from rcmae.finetune.models import classifier_state, init_head, linear_probe_head, load_backbone

log = logging.getLogger(__name__)


class ClassifierLoss(nn.Module):
    """What DDP wraps: the classifier and its criterion, returning the loss in TrainStep's format."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, imgs, targets):
        return {"loss": self.criterion(self.model(imgs).float(), targets)}


def build_criterion(aug: dict, num_classes: int):
    """timm's Mixup / CutMix (with label smoothing) + soft-target CE, or (smoothed) CE without."""
    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"],
                      label_smoothing=aug["smoothing"], num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if aug["smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(aug["smoothing"])
    return None, nn.CrossEntropyLoss()


def datasets(cfg: dict, run, mode: str):
    """Training and validation sets of the labelled pair (their classes checked by ``labelled_pair``)."""
    d, size = cfg["data"], cfg["model"]["img_size"]
    train_path, val_path, label_space = labelled_pair(d, run.out_dir, run.env.is_main)
    paths, labels, num_classes = labelled_images(train_path, label_space, "data.train_path")
    train = SeededImages(paths, train_transform(size, cfg["aug"], mode), labels)
    val, _ = eval_dataset(val_path, label_space, size, d["crop_pct"], "data.val_path")
    return train, val, num_classes


def validate(cfg: dict, world: int) -> int:
    """Check a config for ``world`` processes (key combinations, data folders, checkpoint files)
    before any work; returns the gradient-accumulation factor."""
    t, m, o = cfg["train"], cfg["model"], cfg["optim"]
    if t["mode"] not in ("finetune", "linprobe"):
        raise ConfigError(f"train.mode must be finetune or linprobe, got {t['mode']!r}")
    check_arch(m["arch"], m["img_size"])
    if m["global_pool"] not in GLOBAL_POOLS:
        raise ConfigError(f"model.global_pool must be one of {GLOBAL_POOLS}, got {m['global_pool']!r}")
    if o["name"] not in FINETUNE_OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {FINETUNE_OPTIMIZERS}, got {o['name']!r}")
    check_loggers(cfg["log"])
    accum = accumulation_steps(o["batch_size"], t["micro_batch"], world)
    if (cfg["aug"]["mixup"] > 0 or cfg["aug"]["cutmix"] > 0) and t["micro_batch"] % 2:
        raise ConfigError("mixup / cutmix need an even train.micro_batch")
    check_folder_pair(cfg["data"], "data")
    try:  # timm parses the augmentation strings (aug.rand_augment) when it builds the transform
        train_transform(m["img_size"], cfg["aug"], t["mode"])
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"aug.rand_augment={cfg['aug']['rand_augment']!r} is not a timm augmentation "
                          f"(e.g. rand-m9-mstd0.5-inc1, as MAE fine-tunes; null: none): {e}") from None
    ckpt.check_checkpoint_option("init.checkpoint", cfg["init"]["checkpoint"])
    ckpt.check_which("init.which", cfg["init"]["which"])
    ckpt.check_checkpoint_option("train.resume", t["resume"])
    return accum


class ClassifierTrainer(DefaultTrainer):
    """Fine-tuning (``train.mode=finetune``) or linear probing (``linprobe``) of a ViT classifier on the
    frame of :class:`~rcmae.core.trainer.DefaultTrainer`; hooks: metrics, evaluation (keeping the best
    classifier), checkpoint."""

    def __init__(self, cfg: dict, run):
        self.mode = self.metrics_prefix = cfg["train"]["mode"]
        super().__init__(cfg, run)
        m = cfg["model"]
        # what every saved classifier says about itself (robustness/ rebuilds the model from it)
        self.describe = {"format": ckpt.CLASSIFIER_FORMAT, "arch": m["arch"], "img_size": m["img_size"],
                         "global_pool": m["global_pool"], "num_classes": self.num_classes, "mode": self.mode}

    def build_train_set(self):
        self.train_set, self.val_set, self.num_classes = datasets(self.cfg, self.run, self.mode)
        self.mixup, self.criterion = build_criterion(self.cfg["aug"], self.num_classes)
        self.val_loader = shard_loader(self.val_set, self.cfg["eval"]["batch_size"], self.env.world_size,
                                       self.env.rank, self.cfg["data"]["num_workers"], self.device.type == "cuda")
        return self.train_set

    def build_schedule(self):
        o = self.cfg["optim"]
        warmup_steps = int(o["warmup_epochs"] * self.steps_per_epoch)
        return lambda step: lr_at(step, warmup_steps, self.total_steps, self.peak_lr, o["min_lr"])

    def build_model(self) -> nn.Module:
        m, init = self.cfg["model"], self.cfg["init"]
        model = build_classifier(m["arch"], m["img_size"], self.num_classes, m["global_pool"],
                                 m["drop_path"] if self.mode == "finetune" else 0.0)
        if init["checkpoint"] and self.resume_path is None:
            load_backbone(model, init["checkpoint"], init["which"])
        init_head(model, m["head_init_std"])
        if self.mode == "linprobe":
            linear_probe_head(model)
        return model.to(self.device)

    def build_optimizer(self):
        optimizer = build_finetune_optimizer(self.model, self.cfg["optim"], self.device.type)
        return optimizer, optim_param_names(self.model, optimizer)

    def restore(self) -> int:
        self.storage.put(best={"top1": -1.0}, result=None)
        if self.resume_path is None:
            return 0
        state = ckpt.torch_load(self.resume_path)
        if state.get("format") != ckpt.CLASSIFIER_FORMAT:
            raise ckpt.CheckpointError(f"{self.resume_path} is not a fine-tuning checkpoint of this toolkit; "
                                       "to start from pretrained weights use init.checkpoint=...")
        ckpt.load_state(self.model, state["train_model"], f"{self.resume_path} model")
        self.storage.put(best=state["best"])
        return self.checkpointer.restore(state, self.resume_path)

    def build_forward(self) -> nn.Module:
        return ClassifierLoss(self.model, self.criterion)

    def build_hooks(self):
        log_hook, checkpoint_hook, close_hook = self.standard_hooks()
        every_eval = self.cfg["eval"]["every_epochs"]
        return [log_hook,
                PeriodicHook(lambda trainer: trainer.step == self.total_steps or trainer.every_epochs(every_eval),
                             ClassifierTrainer.evaluate_and_keep_best),
                checkpoint_hook, close_hook]

    def next_inputs(self) -> list[tuple]:
        seed, world, rank = self.cfg["train"]["seed"], self.env.world_size, self.env.rank
        micro = []
        for k in range(self.accum):
            imgs, labels, n_skipped = next(self.batches)
            imgs, labels = imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if self.mixup is not None:
                with seeded(sample_seed(seed, self.step, k * world + rank)):
                    imgs, labels = self.mixup(imgs, labels)
            micro.append((imgs, labels))
            self.skipped += int(n_skipped.sum())
        return micro

    def run_step(self) -> None:
        lr = self.schedule(self.step)
        torch.manual_seed(sample_seed(self.cfg["train"]["seed"] + 1, self.step, self.env.rank))  # drop path
        sums = self.train_step(self.inputs, lr)
        self.add_metrics(sums)
        self.storage.put(lr=lr)

    def evaluate_and_keep_best(self) -> None:
        result = evaluate(self.model, self.val_loader, self.device, self.run.amp_dtype)
        self.storage.put(result=result)
        log.info("epoch %d eval: top-1 %.2f top-5 %.2f on %d images (%d unreadable)", self.epoch,
                 result["top1"], result["top5"], result["n"], result["unreadable"])
        self.metrics.write({"step": self.step, "epoch": self.epoch, **{f"eval_{k}": v for k, v in result.items()}},
                           self.env.is_main)
        if result["top1"] > self.storage.get("best")["top1"]:
            self.storage.put(best={**result, "epoch": self.epoch, "step": self.step})
            if self.env.is_main:
                self.save_best(result)

    def save_best(self, result: dict) -> None:
        """The best classifier as an MAE-style file and a timm folder (``timm.create_model("local-dir:...")``)."""
        m, out_dir = self.cfg["model"], self.run.out_dir
        weights = classifier_state(self.model)
        ckpt.atomic_save({**self.describe, "model": weights, "eval": result, "config": self.cfg},
                         out_dir / "classifier_best.pth")
        classifier = ckpt.timm_vit(weights, m["arch"], m["img_size"], "the best classifier", self.num_classes,
                                   m["global_pool"], self.cfg["data"]["crop_pct"])
        ckpt.save_timm_folder(classifier, m["arch"], m["img_size"], out_dir / "classifier_best")

    def save(self) -> None:
        self.checkpointer.save(self.step, **self.describe, model=classifier_state(self.model),
                               train_model=self.model.state_dict(), best=self.storage.get("best"),
                               eval=self.storage.get("result"))

    def log_start(self) -> None:
        m, t, o = self.cfg["model"], self.cfg["train"], self.cfg["optim"]
        log.info("%s %s (%d classes) on %d train / %d val images; %d process(es), micro-batch %d x accum %d "
                 "= batch %d, %d steps/epoch, %d steps, peak lr %.3g, %s, precision %s", self.mode, m["arch"],
                 self.num_classes, len(self.train_set), len(self.val_set), self.env.world_size, t["micro_batch"],
                 self.accum, o["batch_size"], self.steps_per_epoch, self.total_steps, self.peak_lr, o["name"],
                 self.run.precision)


def main(cfg: dict) -> dict:
    run = start_run(cfg, validate)  # checked before the output directory is touched
    trainer = ClassifierTrainer(cfg, run)
    trainer.log_start()
    summary = trainer.fit()
    best, out_dir = trainer.storage.get("best"), run.out_dir
    kept = best["top1"] >= 0
    summary.update(best_classifier=str(out_dir / "classifier_best.pth") if kept else "",
                   timm_folder=str(out_dir / "classifier_best") if kept else "", best=best,
                   eval=trainer.storage.get("result"))
    if run.env.is_main and kept:
        log.info("best top-1 %.2f (epoch %d)", best["top1"], best["epoch"])
    barrier()
    return summary
