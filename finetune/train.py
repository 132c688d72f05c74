"""Fine-tuning (MAE recipe) and linear probing of ViT backbones: ``main(cfg)``, like pretraining,
runs on one CPU process, torchrun or SLURM tasks, resumes exactly, and evaluates exactly under DDP.
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from rcmae.core import checkpoint as ckpt
from rcmae.core.data.datasets import SeededImages, eval_dataset
from rcmae.core.data.readers import check_folder_pair, labelled_images, labelled_pair
from rcmae.core.data.sampler import sample_seed, seeded, shard_loader
from rcmae.core.data.subsets import check_subset_options, held_out_split, labelled_subset
from rcmae.core.data.transforms import classifier_train_transform as train_transform
from rcmae.core.data.transforms import eval_transform
from rcmae.core.distributed import barrier
from rcmae.core.engine import PeriodicHook
from rcmae.core.errors import ConfigError
from rcmae.core.evaluate import evaluate, evaluate_heads
from rcmae.core.optim import FINETUNE_OPTIMIZERS, LARS, LR_SCALE, build_finetune_optimizer
from rcmae.core.optim import param_names as optim_param_names
from rcmae.core.run import accumulation_steps, check_loggers, start_run
from rcmae.core.schedules import lr_at
from rcmae.core.trainer import DefaultTrainer
from rcmae.core.vit import GLOBAL_POOLS, build_classifier, check_arch
from rcmae.finetune.models import classifier_state, fold_probe, init_head, linear_probe_head, load_backbone
from rcmae.finetune.probe_grid import ProbeGrid, grid_specs

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


def grid_heads(cfg: dict) -> list:
    """The heads of a linear-probe grid (``grid`` section); [] for one head (MAE's probe, or fine-tuning)."""
    if not cfg.get("grid"):
        return []
    depth = check_arch(cfg["model"]["arch"], cfg["model"]["img_size"])["depth"]
    return grid_specs(cfg["grid"], cfg["optim"]["base_lr"], depth)


def datasets(cfg: dict, run, mode: str):
    """Training and validation sets of the labelled pair (their classes checked by ``labelled_pair``), the
    training images cut to ``data.label_fraction`` / ``data.subset_file``; with a probe grid, also its held-out
    part of them (``grid.held_out_fraction`` of each class; None otherwise)."""
    d, size = cfg["data"], cfg["model"]["img_size"]
    train_path, val_path, label_space = labelled_pair(d, run.out_dir, run.env.is_main)
    paths, labels, num_classes = labelled_images(train_path, label_space, "data.train_path")
    paths, labels = labelled_subset(paths, labels, d)
    held_out = None
    if grid_heads(cfg):
        kept, held = held_out_split(labels, cfg["grid"]["held_out_fraction"], cfg["train"]["seed"],
                                    "grid.held_out_fraction")
        held_out = SeededImages([paths[i] for i in held], eval_transform(size, d["crop_pct"]),
                                [labels[i] for i in held], replace_unreadable=False)
        paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    train = SeededImages(paths, train_transform(size, cfg["aug"], mode), labels)
    val, _ = eval_dataset(val_path, label_space, size, d["crop_pct"], "data.val_path")
    return train, val, num_classes, held_out


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
    check_subset_options(cfg["data"], "data")
    if grid_heads(cfg):
        if t["mode"] != "linprobe" or o["name"] != "lars":
            raise ConfigError("the grid section trains linear probes with LARS (train.mode=linprobe, "
                              f"optim.name=lars); got train.mode={t['mode']}, optim.name={o['name']}: empty "
                              "grid.base_lrs and grid.features for one head")
        if not 0 < cfg["grid"]["held_out_fraction"] < 1:
            raise ConfigError(f"grid.held_out_fraction must be in (0, 1), got {cfg['grid']['held_out_fraction']}")
        if (o["lr"] if o["lr"] is not None else o["base_lr"]) <= 0:
            raise ConfigError("a probe grid scales each head's lr from the run's: optim.base_lr (or optim.lr) must "
                              "be positive")
    try:  # timm parses the augmentation strings (aug.rand_augment) when it builds the transform
        train_transform(m["img_size"], cfg["aug"], t["mode"])
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"aug.rand_augment={cfg['aug']['rand_augment']!r} is not a timm augmentation "
                          f"(e.g. rand-m9-mstd0.5-inc1, as MAE fine-tunes; null: none): {e}") from None
    ckpt.check_checkpoint_option("init.checkpoint", cfg["init"]["checkpoint"])
    ckpt.check_which("init.which", cfg["init"]["which"])
    ckpt.check_checkpoint_option("train.resume", t["resume"])
    return accum


class GridLoss(nn.Module):
    """What DDP wraps for a probe grid: the summed loss of every head (each head's gradient is its own loss's)."""

    def __init__(self, model: ProbeGrid, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, imgs, targets):
        logits = self.model(imgs).float()
        return {"loss": sum(self.criterion(head_logits, targets) for head_logits in logits)}


class ClassifierTrainer(DefaultTrainer):
    """Fine-tuning (``train.mode=finetune``) or linear probing (``linprobe``) of a ViT classifier on the
    frame of :class:`~rcmae.core.trainer.DefaultTrainer`; hooks: metrics, evaluation (keeping the best
    classifier), checkpoint."""

    checkpoint_format = ckpt.CLASSIFIER_FORMAT

    def __init__(self, cfg: dict, run):
        self.mode = self.metrics_prefix = cfg["train"]["mode"]
        super().__init__(cfg, run)
        m = cfg["model"]
        # what every saved classifier says about itself (robustness/ rebuilds the model from it)
        self.describe = {"format": self.checkpoint_format, "arch": m["arch"], "img_size": m["img_size"],
                         "global_pool": m["global_pool"], "num_classes": self.num_classes, "mode": self.mode}

    def build_train_set(self):
        self.train_set, self.val_set, self.num_classes, self.held_out = datasets(self.cfg, self.run, self.mode)
        self.mixup, self.criterion = build_criterion(self.cfg["aug"], self.num_classes)
        self.val_loader, self.held_out_loader = (
            None if dataset is None else shard_loader(dataset, self.cfg["eval"]["batch_size"], self.env.world_size,
                                                      self.env.rank, self.cfg["data"]["num_workers"],
                                                      self.device.type == "cuda")
            for dataset in (self.val_set, self.held_out))
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

    def no_best(self) -> dict:
        """What ``storage``'s ``best`` holds before the first evaluation."""
        return {"top1": -1.0}

    def restore(self) -> int:
        self.storage.put(best=self.no_best(), result=None)
        if self.resume_path is None:
            return 0
        state = ckpt.torch_load(self.resume_path)
        if state.get("format") != self.checkpoint_format:
            raise ckpt.CheckpointError(f"{self.resume_path} is not a {self.checkpoint_format} checkpoint (format "
                                       f"{state.get('format')!r}): a run resumes from its own kind (a probe grid and "
                                       "a single head do not mix); to start from pretrained weights use "
                                       "init.checkpoint=...")
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
                             lambda trainer: trainer.evaluate_and_keep_best()),
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

    def results(self) -> dict:
        """What the run's summary adds: the best classifier (its files) and the last evaluation."""
        best, out_dir = self.storage.get("best"), self.run.out_dir
        kept = best["top1"] >= 0
        if self.env.is_main and kept:
            log.info("best top-1 %.2f (epoch %d)", best["top1"], best["epoch"])
        return {"best_classifier": str(out_dir / "classifier_best.pth") if kept else "",
                "timm_folder": str(out_dir / "classifier_best") if kept else "", "best": best,
                "eval": self.storage.get("result")}

    def log_start(self) -> None:
        m, t, o = self.cfg["model"], self.cfg["train"], self.cfg["optim"]
        log.info("%s %s (%d classes) on %d train / %d val images; %d process(es), micro-batch %d x accum %d "
                 "= batch %d, %d steps/epoch, %d steps, peak lr %.3g, %s, precision %s", self.mode, m["arch"],
                 self.num_classes, len(self.train_set), len(self.val_set), self.env.world_size, t["micro_batch"],
                 self.accum, o["batch_size"], self.steps_per_epoch, self.total_steps, self.peak_lr, o["name"],
                 self.run.precision)


class ProbeGridTrainer(ClassifierTrainer):
    """The linear-probe grid (:mod:`rcmae.finetune.probe_grid`): one frozen backbone pass per batch trains every
    head; each evaluation scores every head on the held-out part of the training images and on val, and the head
    (and epoch) with the best held-out top-1 is the run's result: val never chooses. Writes ``grid.json`` (every
    head's table) and ``probe_best.pth`` (the chosen head, its BatchNorm folded into the Linear)."""

    checkpoint_format = ckpt.PROBE_GRID_FORMAT

    def __init__(self, cfg: dict, run):
        self.specs = grid_heads(cfg)
        super().__init__(cfg, run)
        self.describe = {k: v for k, v in self.describe.items() if k != "global_pool"}
        self.describe["heads"] = [s.name for s in self.specs]

    def build_model(self) -> nn.Module:
        m, init = self.cfg["model"], self.cfg["init"]
        backbone = build_classifier(m["arch"], m["img_size"], 0, "token")
        if init["checkpoint"] and self.resume_path is None:
            load_backbone(backbone, init["checkpoint"], init["which"])
        return ProbeGrid(backbone, self.specs, self.num_classes, self.cfg["train"]["seed"]).to(self.device)

    def build_optimizer(self):
        """LARS with one group per head, at its own lr: ``LR_SCALE`` = the head's peak lr / the run's."""
        o = self.cfg["optim"]
        groups = [{"params": list(head.parameters()), LR_SCALE: s.base_lr * o["batch_size"] / 256 / self.peak_lr}
                  for s, head in zip(self.specs, self.model.heads)]
        optimizer = LARS(groups, lr=0.0, weight_decay=o["weight_decay"], momentum=o["momentum"])
        return optimizer, optim_param_names(self.model, optimizer)

    def build_forward(self) -> nn.Module:
        return GridLoss(self.model, self.criterion)

    def no_best(self) -> dict:
        return {"heads": {}, "chosen": None}  # per head: its evaluation with the best held-out top-1

    def evaluate_and_keep_best(self) -> None:
        n = len(self.specs)
        held = evaluate_heads(self.model, self.held_out_loader, self.device, self.run.amp_dtype, heads=n)
        val = evaluate_heads(self.model, self.val_loader, self.device, self.run.amp_dtype, heads=n)
        best = self.storage.get("best")
        previous = best["heads"].get(best["chosen"])  # records are replaced, never changed in place
        for spec, h, v in zip(self.specs, held, val):
            record = {"epoch": self.epoch, "step": self.step, "held_out_top1": h["top1"], "held_out_top5": h["top5"],
                      "held_out_n": h["n"], "top1": v["top1"], "top5": v["top5"], "n": v["n"],
                      "unreadable": v["unreadable"] + h["unreadable"]}
            kept = best["heads"].get(spec.name)
            if kept is None or (h["top1"], h["top5"]) > (kept["held_out_top1"], kept["held_out_top5"]):
                best["heads"][spec.name] = record
        chosen = max(self.specs, key=lambda s: (best["heads"][s.name]["held_out_top1"],
                                                best["heads"][s.name]["held_out_top5"]))  # first of equals
        best["chosen"] = chosen.name
        self.storage.put(best=best, result={s.name: {"held_out": h, "val": v}
                                            for s, h, v in zip(self.specs, held, val)})
        pick = best["heads"][chosen.name]
        log.info("epoch %d eval: %d heads; best on the held-out images: %s (held-out top-1 %.2f at epoch %d): val "
                 "top-1 %.2f top-5 %.2f on %d images", self.epoch, n, chosen.name, pick["held_out_top1"],
                 pick["epoch"], pick["top1"], pick["top5"], pick["n"])
        self.metrics.write({"step": self.step, "epoch": self.epoch, "eval_top1": pick["top1"],
                            "eval_top5": pick["top5"], "eval_n": pick["n"], "eval_head": chosen.name,
                            "eval_held_out_top1": pick["held_out_top1"],
                            "eval_heads": {s.name: [h["top1"], v["top1"]] for s, h, v in zip(self.specs, held, val)}},
                           self.env.is_main)
        if self.env.is_main:
            text = json.dumps(self.grid_table(), indent=2) + "\n"
            ckpt.atomic_write(self.run.out_dir / "grid.json", lambda tmp: tmp.write_text(text), len(text))
            if best["heads"][chosen.name] is not previous:
                self.save_best(chosen)

    def grid_table(self) -> dict:
        """``grid.json``: the chosen head, and each head's best held-out evaluation with its val numbers."""
        best = self.storage.get("best")
        heads = [{"name": s.name, "base_lr": s.base_lr, "feature": s.feature, **best["heads"][s.name]}
                 for s in self.specs]
        return {"chosen": best["chosen"], "chosen_by": "held-out top-1 (then top-5), first of equals",
                "train_images": len(self.train_set), "held_out_images": len(self.held_out),
                "val_images": len(self.val_set), "heads": heads}

    def save_best(self, chosen) -> None:
        head = self.model.heads[self.specs.index(chosen)]
        ckpt.atomic_save({**self.describe, "head": chosen.name, "feature": chosen.feature, "base_lr": chosen.base_lr,
                          "linear": fold_probe(head), "eval": self.storage.get("best")["heads"][chosen.name],
                          "backbone": self.cfg["init"]["checkpoint"], "config": self.cfg},
                         self.run.out_dir / "probe_best.pth")

    def save(self) -> None:
        self.checkpointer.save(self.step, **self.describe, train_model=self.model.state_dict(),
                               best=self.storage.get("best"), eval=self.storage.get("result"))

    def results(self) -> dict:
        best = self.storage.get("best")
        if best["chosen"] is None:
            return {"grid": None}
        table = self.grid_table()
        if self.env.is_main:
            log.info("probe grid: %d heads (held-out top-1 | val top-1 at that epoch)\n%s", len(self.specs),
                     "\n".join(f"  {h['name']:>24}  {h['held_out_top1']:6.2f} | {h['top1']:6.2f}  (epoch {h['epoch']})"
                               + ("  <- chosen" if h["name"] == best["chosen"] else "") for h in table["heads"]))
        chosen = best["heads"][best["chosen"]]
        return {"grid": table, "best": {**chosen, "head": best["chosen"]},
                "probe_best": str(self.run.out_dir / "probe_best.pth")}

    def log_start(self) -> None:
        super().log_start()
        log.info("probe grid: %d heads (%s); %d held-out training images choose the head", len(self.specs),
                 ", ".join(s.name for s in self.specs), len(self.held_out))


def main(cfg: dict) -> dict:
    run = start_run(cfg, validate)  # checked before the output directory is touched
    trainer = (ProbeGridTrainer if grid_heads(cfg) else ClassifierTrainer)(cfg, run)
    trainer.log_start()
    summary = trainer.fit()
    summary.update(trainer.results())
    barrier()
    return summary
