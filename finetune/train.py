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
from rcmae.core.data import (
    SeededImages,
    check_folder_pair,
    eval_dataset,
    labelled_images,
    labelled_pair,
    sample_seed,
    seeded,
    train_batches,
)
from rcmae.core.distributed import barrier
from rcmae.core.engine import FinallyHook, PeriodicHook, TrainLoop, TrainStep, training_forward
from rcmae.core.errors import ConfigError
from rcmae.core.evaluate import evaluate, shard_loader
from rcmae.core.run import (
    MetricLogger,
    accumulation_steps,
    check_loggers,
    progress,
    start_run,
)
from rcmae.core.schedules import lr_at
from rcmae.core.vit import build_classifier, check_arch
from rcmae.finetune.data import train_transform
from rcmae.finetune.lars import LARS
from rcmae.finetune.models import classifier_state, init_head, linear_probe_head, load_backbone

log = logging.getLogger(__name__)


class ClassifierLoss(nn.Module):
    """What DDP wraps: the classifier and its criterion, returning the loss in TrainStep's format."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, imgs, targets):
        return {"loss": self.criterion(self.model(imgs).float(), targets)}


def layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit``: 0 for the embeddings, i + 1 for block i, depth + 1 for the
    rest (final ``norm``, ``fc_norm``, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """MAE's ``param_groups_lrd``: ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no weight
    decay on 1-d tensors and ``model.no_weight_decay()`` (pos_embed, cls_token)."""
    depth, skip = len(model.blocks), model.no_weight_decay()
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_decay = layer_id(name, depth), p.ndim == 1 or name in skip
        group = groups.setdefault((layer, no_decay), {
            "params": [], "lr_scale": layer_decay ** (depth + 1 - layer),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, o: dict, device_type: str):
    """AdamW with MAE's layer-wise lr decay (``layer_decay_groups``), LARS (linear probe: MAE's rule,
    :class:`~rcmae.finetune.lars.LARS`) or SGD."""
    if o["name"] == "adamw":
        groups = layer_decay_groups(model, o["weight_decay"], o["layer_decay"])
        fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o["betas"]), **fast)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if o["name"] == "lars":  # MAE's probe: one group; LARS itself exempts 1-d tensors
        return LARS(trainable, lr=0.0, weight_decay=o["weight_decay"], momentum=o["momentum"])
    matrices = [p for p in trainable if p.ndim > 1]
    vectors = [p for p in trainable if p.ndim <= 1]
    if o["name"] == "sgd":
        return torch.optim.SGD([{"params": matrices, "weight_decay": o["weight_decay"]},
                                {"params": vectors, "weight_decay": 0.0}], lr=0.0, momentum=o["momentum"])
    raise ConfigError(f"optim.name must be adamw, lars or sgd, got {o['name']!r}")


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
    check_loggers(cfg["log"])
    accum = accumulation_steps(o["batch_size"], t["micro_batch"], world)
    if (cfg["aug"]["mixup"] > 0 or cfg["aug"]["cutmix"] > 0) and t["micro_batch"] % 2:
        raise ConfigError("mixup / cutmix need an even train.micro_batch")
    check_folder_pair(cfg["data"], "data")
    ckpt.check_checkpoint_option("init.checkpoint", cfg["init"]["checkpoint"])
    ckpt.check_checkpoint_option("train.resume", t["resume"])
    return accum


def main(cfg: dict) -> dict:
    run = start_run(cfg, validate)  # checked before the output directory is touched
    env, device, out_dir = run.env, run.device, run.out_dir
    t, m, o, mode = cfg["train"], cfg["model"], cfg["optim"], cfg["train"]["mode"]
    accum = accumulation_steps(o["batch_size"], t["micro_batch"], env.world_size)
    train_set, val_set, num_classes = datasets(cfg, run, mode)
    mixup, criterion = build_criterion(cfg["aug"], num_classes)

    torch.manual_seed(t["seed"])
    model = build_classifier(m["arch"], m["img_size"], num_classes, m["global_pool"],
                             m["drop_path"] if mode == "finetune" else 0.0)
    resume_path = ckpt.resume_path(t["resume"], out_dir)
    if cfg["init"]["checkpoint"] and resume_path is None:
        load_backbone(model, cfg["init"]["checkpoint"], cfg["init"]["which"])
    init_head(model, m["head_init_std"])
    if mode == "linprobe":
        linear_probe_head(model)
    model.to(device)
    optimizer = build_optimizer(model, o, device.type)
    by_id = {id(p): n for n, p in model.named_parameters()}
    param_names = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler(device.type) if run.precision == "fp16" else None

    steps_per_epoch = len(train_set) // o["batch_size"]
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} images cannot fill one batch of optim.batch_size={o['batch_size']}")
    total_steps, warmup_steps = o["epochs"] * steps_per_epoch, int(o["warmup_epochs"] * steps_per_epoch)
    peak_lr = o["lr"] if o["lr"] is not None else o["base_lr"] * o["batch_size"] / 256
    checkpointer = ckpt.Checkpointer(out_dir, cfg["checkpoint"]["keep"], optimizer, param_names, scaler, cfg,
                                     steps_per_epoch, env.rank)
    step, best = 0, {"top1": -1.0}
    if resume_path is not None:
        state = ckpt.torch_load(resume_path)
        if state.get("format") != ckpt.CLASSIFIER_FORMAT:
            raise ckpt.CheckpointError(f"{resume_path} is not a fine-tuning checkpoint of this toolkit; "
                                       "to start from pretrained weights use init.checkpoint=...")
        ckpt.load_state(model, state["train_model"], f"{resume_path} model")
        step, best = checkpointer.restore(state, resume_path), state["best"]
    stop_step = min(total_steps, t["stop_at_step"] or total_steps)

    forward = training_forward(ClassifierLoss(model, criterion), env.world_size, device, t["compile"])
    step_fn = TrainStep(model, forward, optimizer, run.amp_dtype, device, o["clip_grad"], scaler)
    workers = cfg["data"]["num_workers"]
    loader = train_batches(train_set, t["micro_batch"], accum, env.world_size, env.rank, t["seed"], step,
                           workers, device.type == "cuda")
    val_loader = shard_loader(val_set, cfg["eval"]["batch_size"], env.world_size, env.rank, workers,
                              device.type == "cuda")
    log.info("%s %s (%d classes) on %d train / %d val images; %d process(es), micro-batch %d x accum %d "
             "= batch %d, %d steps/epoch, %d steps, peak lr %.3g, %s, precision %s", mode, m["arch"],
             num_classes, len(train_set), len(val_set), env.world_size, t["micro_batch"], accum,
             o["batch_size"], steps_per_epoch, total_steps, peak_lr, o["name"], run.precision)

    metrics = MetricLogger(device, out_dir if env.is_main else None, cfg,
                           bool(o["clip_grad"]), prefix=mode)
    bar = progress(total=total_steps, initial=step, disable=not env.is_main, unit="step")

    # what every saved classifier says about itself (robustness/ rebuilds the model from it)
    describe = {"format": ckpt.CLASSIFIER_FORMAT, "arch": m["arch"], "img_size": m["img_size"],
                "global_pool": m["global_pool"], "num_classes": num_classes, "mode": mode}

    current = {"result": None, "best": best}

    def train_step(step: int) -> None:
        lr = lr_at(step, warmup_steps, total_steps, peak_lr, o["min_lr"])
        micro, skipped = [], 0
        for k in range(accum):
            imgs, labels, n_skipped = next(loader)
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                with seeded(sample_seed(t["seed"], step, k * env.world_size + env.rank)):
                    imgs, labels = mixup(imgs, labels)
            micro.append((imgs, labels))
            skipped += int(n_skipped.sum())
        torch.manual_seed(sample_seed(t["seed"] + 1, step, env.rank))  # drop path: f(seed, step)
        sums = step_fn(micro, lr)
        metrics.add(step, sums, accum, skipped, accum * t["micro_batch"], loader.take_wait())
        bar.update(1)
        current["lr"] = lr

    def checkpoint_due(loop) -> bool:
        return (loop.interrupted is not None or loop.step == loop.stop
                or loop.every_epochs(cfg["checkpoint"]["every_epochs"]))

    def log_metrics(loop) -> None:  # before a checkpoint: a non-finite loss stops the run unsaved
        record = metrics.flush(loop.step, loop.step / steps_per_epoch, env.is_main, lr=current["lr"])
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{current['lr']:.2e}", data=f"{record['data_wait_frac']:.0%}")

    def evaluate_and_keep_best(loop) -> None:
        result = current["result"] = evaluate(model, val_loader, device, run.amp_dtype)
        log.info("epoch %d eval: top-1 %.2f top-5 %.2f on %d images (%d unreadable)", loop.epoch,
                 result["top1"], result["top5"], result["n"], result["unreadable"])
        metrics.write({"step": loop.step, "epoch": loop.epoch, **{f"eval_{k}": v for k, v in result.items()}},
                      env.is_main)
        if result["top1"] > current["best"]["top1"]:
            current["best"] = {**result, "epoch": loop.epoch, "step": loop.step}
            if env.is_main:  # MAE-style file, and a timm folder: timm.create_model("local-dir:...")
                weights = classifier_state(model)
                ckpt.atomic_save({**describe, "model": weights, "eval": result, "config": cfg},
                                 out_dir / "classifier_best.pth")
                classifier = ckpt.timm_vit(weights, m["arch"], m["img_size"], "the best classifier", num_classes,
                                           m["global_pool"], cfg["data"]["crop_pct"])
                ckpt.save_timm_folder(classifier, m["arch"], m["img_size"], out_dir / "classifier_best")

    hooks = [PeriodicHook(lambda loop: checkpoint_due(loop) or loop.every_steps(cfg["log"]["every_steps"]),
                          log_metrics),
             PeriodicHook(lambda loop: loop.step == total_steps or loop.every_epochs(cfg["eval"]["every_epochs"]),
                          evaluate_and_keep_best),
             PeriodicHook(checkpoint_due, lambda loop: checkpointer.save(
                 loop.step, **describe, model=classifier_state(model), train_model=model.state_dict(),
                 best=current["best"], eval=current["result"])),
             FinallyHook(lambda loop: (bar.close(), metrics.close()))]
    step = TrainLoop(train_step, step, stop_step, steps_per_epoch, hooks).run()
    best, result = current["best"], current["result"]

    summary = {"output_dir": str(out_dir), "step": step, "checkpoint": str(ckpt.find_last_checkpoint(out_dir) or ""),
               "best_classifier": str(out_dir / "classifier_best.pth") if best["top1"] >= 0 else "",
               "timm_folder": str(out_dir / "classifier_best") if best["top1"] >= 0 else "",
               "metrics": str(out_dir / "metrics.jsonl"), "best": best, "eval": result}
    if env.is_main and best["top1"] >= 0:
        log.info("best top-1 %.2f (epoch %d)", best["top1"], best["epoch"])
    barrier()
    return summary
