"""RC-MAE / MAE pretraining: ``main(cfg)`` runs on one CPU process, torchrun, or SLURM tasks."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import default_collate

from rcmae.core import checkpoint as ckpt
from rcmae.core.data import (
    SeededImages,
    SyntheticImages,
    check_folder_pair,
    image_folder_classes,
    labelled_eval_sets,
    list_images,
    shared_image_list,
    train_batches,
)
from rcmae.core.demo_data import build_demo_folder
from rcmae.core.distributed import barrier
from rcmae.core.engine import FinallyHook, PeriodicHook, TrainLoop, TrainStep, training_forward
from rcmae.core.errors import ConfigError
from rcmae.core.knn import knn_evaluate
from rcmae.core.run import (
    AMP_DTYPES,
    MetricLogger,
    accumulation_steps,
    check_loggers,
    progress,
    start_run,
)
from rcmae.core.shards import is_shard_dir, load_index
from rcmae.core.vit import build_classifier, check_arch, is_encoder_key
from rcmae.pretrain.data import PIPELINES, collate_for, model_input, pretrain_transform
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.probe import TrainingProbe
from rcmae.pretrain.rcmae import (
    METRICS,
    MOMENTUM_SCHEDULES,
    RCMAE,
    StepSchedules,
    build_optimizer,
    mask_noise,
    official_micro_batches,
    param_groups,
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
    if t["precision"] not in ("auto", *AMP_DTYPES):
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got {t['precision']!r}")
    knn = cfg["knn"]
    if knn["every_epochs"]:
        check_folder_pair(knn, "knn")
    ckpt.check_checkpoint_option("train.init", t["init"])
    ckpt.check_checkpoint_option("train.resume", t["resume"])
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


def build_dataset(cfg: dict, out_dir: Path, is_main: bool):
    d, size = cfg["data"], cfg["model"]["img_size"]
    if d["source"] == "synthetic":
        return SyntheticImages(d["synthetic_size"], size)
    if d["source"] == "shards":
        sources = load_index(d["path"])[0]
    elif d["source"] == "demo":
        if is_main:
            build_demo_folder(out_dir / "demo_data")
        barrier()
        sources = list_images(out_dir / "demo_data")
    else:
        sources = shared_image_list(d["path"], out_dir, is_main)
    return SeededImages(sources, pretrain_transform(size, d["crop_min_scale"], d["pipeline"]))


def restore(cfg: dict, model: RCMAE, checkpointer: ckpt.Checkpointer, out_dir: Path) -> int:
    """Resume (auto / a file) or initialise from a checkpoint; returns the first step to run."""
    path = ckpt.resume_path(cfg["train"]["resume"], out_dir)
    if path is not None:
        c = ckpt.read_checkpoint(path)
        log.info("resuming from %s (%s checkpoint)", path, c.source)
        load_models(model, c, str(path))
        if c.source == "ours":
            return checkpointer.restore(c.raw, path)
        # official MAE / RC-MAE: the optimizer in the official parameter order, the step from the epoch
        checkpointer.restore_optimizer(c.raw, param_groups(model.student, 0.0, decay_tokens=True)[1])
        log.info("continuing after the official checkpoint's epoch %d", c.raw["epoch"])
        return (int(c.raw["epoch"]) + 1) * checkpointer.steps_per_epoch
    if cfg["train"]["init"]:
        c = ckpt.read_checkpoint(cfg["train"]["init"])
        log.info("initialising from %s (%s checkpoint)", cfg["train"]["init"], c.source)
        load_models(model, c, "train.init", may_miss=lambda key: True)
    return 0


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
    source = model.teacher if model.teacher is not None else model.student
    backbone = build_classifier(cfg["model"]["arch"], cfg["model"]["img_size"], 0, "token")
    backbone.load_state_dict({k: v for k, v in source.state_dict().items() if is_encoder_key(k)})
    return knn_evaluate(backbone.to(run.device), *sets, run.device, run.amp_dtype, cfg["knn"],
                        run.env.world_size, run.env.rank, cfg["data"]["num_workers"])


def main(cfg: dict) -> dict:
    """Train; returns a summary (output paths, last metrics). Safe to call again after a requeue."""
    t = cfg["train"]
    run = start_run(cfg, validate)  # checked before the output directory is touched
    env, device, out_dir, precision, amp_dtype = (run.env, run.device, run.out_dir, run.precision,
                                                  run.amp_dtype)
    device_type = device.type
    accum = accumulation_steps(cfg["optim"]["batch_size"], t["micro_batch"], env.world_size)
    if cfg["data"]["pipeline"] == "gpu" and device_type != "cuda":
        log.warning("data.pipeline=gpu decodes with nvJPEG and needs CUDA; on %s this run uses the fast CPU "
                    "pipeline instead (the same crops and flips for the same seed)", device_type)
        cfg["data"]["pipeline"] = "fast"

    m, o = cfg["model"], cfg["optim"]
    torch.manual_seed(t["seed"])  # identical initial weights on every rank
    student = build_mae(m["arch"], m["img_size"], m["decoder_dim"], m["decoder_depth"],
                        m["decoder_heads"], m["norm_pix_loss"])
    model = RCMAE(student, m["mask_ratio"], cfg["rcmae"]["gamma"], cfg["rcmae"]["teacher_mask"]).to(device)
    optimizer, param_names = build_optimizer(model.student, o["weight_decay"], o["betas"], device_type,
                                             o["decay_tokens"])
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    dataset = build_dataset(cfg, out_dir, env.is_main)
    knn_sets = knn_datasets(cfg, out_dir, env.is_main)
    global_batch = o["batch_size"]
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} images cannot fill one batch of optim.batch_size={global_batch}")
    total_steps = o["epochs"] * steps_per_epoch
    peak_lr = o["lr"] if o["lr"] is not None else o["base_lr"] * global_batch / 256
    kind = cfg["rcmae"]["momentum_schedule"]
    schedules = StepSchedules(kind, steps_per_epoch, o["epochs"], accum, o["warmup_epochs"], peak_lr, o["min_lr"],
                              cfg["rcmae"]["momentum"],
                              official_micro_batches(len(dataset), env.world_size, t["micro_batch"])
                              if kind == "official" else None)
    ck = cfg["checkpoint"]
    checkpointer = ckpt.Checkpointer(out_dir, ck["keep"], optimizer, param_names, scaler, cfg, steps_per_epoch,
                                     env.rank)
    start_step = restore(cfg, model, checkpointer, out_dir)
    stop_step = min(total_steps, t["stop_at_step"] or total_steps)

    every = cfg["analysis"]["every_steps"]
    probe = TrainingProbe(model, every, amp_dtype) if every and env.is_main else None
    forward = training_forward(model, env.world_size, device, t["compile"])
    step_fn = TrainStep(model, forward, optimizer, amp_dtype, device, o["clip_grad"], scaler,
                        on_update=model.update_teacher, metric_keys=METRICS)

    collate = collate_for(cfg["data"]["pipeline"]) or default_collate
    pin = device_type == "cuda" and collate is default_collate  # the GPU pipeline's bytes need no pinned copy
    batches = train_batches(dataset, t["micro_batch"], accum, env.world_size, env.rank, t["seed"],
                            start_step, cfg["data"]["num_workers"], pin, collate)
    n_recon = min(cfg["log"]["recon_images"], len(dataset))  # spread over the (sorted) folders
    recon_batch = model_input(collate([dataset[(i * len(dataset) // n_recon, i)] for i in range(n_recon)])[0],
                              device, m["img_size"])
    recon_noise = mask_noise(t["seed"] + 1, 0, len(recon_batch), model.student.num_patches, device,
                             model.teacher_mask == "different")
    log.info("model %s (%.1fM student params), teacher: %s, %d process(es), micro-batch %d x accum %d "
             "= batch %d, %d steps/epoch, %d steps in all, peak lr %.3g, precision %s, device %s",
             m["arch"], sum(p.numel() for p in model.student.parameters()) / 1e6,
             f"EMA ({cfg['rcmae']['momentum_schedule']} schedule)" if model.teacher is not None else "none (MAE)",
             env.world_size, t["micro_batch"],
             accum, global_batch, steps_per_epoch, total_steps, peak_lr, precision, device)
    if schedules.leftover:
        log.info("official schedule: %d micro-batches per process and epoch as in the official loop; the %d left "
                 "after an epoch's last optimizer step update the teacher only (their gradient is discarded there)",
                 schedules.micro_per_epoch, schedules.leftover)

    metrics = MetricLogger(device, out_dir if env.is_main else None, cfg,
                           bool(o["clip_grad"]), keys=METRICS, prefix="pretrain")
    bar = progress(total=total_steps, initial=start_step, disable=not env.is_main, unit="step")
    current = {"record": {}}

    def train_step(step: int) -> None:
        lr, momenta = schedules.lr(step), schedules.momenta(step)
        noise = mask_noise(t["seed"], step, global_batch, model.student.num_patches, device,
                           model.teacher_mask == "different")
        micro, skipped = [], 0
        for k in range(accum):
            imgs, _, n_skipped = next(batches)
            first = (k * env.world_size + env.rank) * t["micro_batch"]
            micro.append((model_input(imgs, device, m["img_size"]), noise[..., first:first + t["micro_batch"], :]))
            skipped += int(n_skipped.sum())  # a CPU tensor: no device sync
        if probe:  # before the step: the gradients at the weights the step starts from
            record = probe.measure(step, *micro[0])
            if record:
                metrics.write({"step": step, "epoch": round(step / steps_per_epoch, 4),
                               **{f"probe_{k}": v for k, v in record.items()}}, env.is_main)
        sums = step_fn(micro, lr, momenta)
        for momentum in schedules.leftover_momenta(step):  # official: the epoch's leftover micro-batches
            model.update_teacher(momentum)
        if probe:
            probe.after_step()
        metrics.add(step, sums, accum, skipped, accum * t["micro_batch"], batches.take_wait())
        bar.update(1)
        current.update(lr=lr, momentum=momenta[-1])

    def checkpoint_due(loop) -> bool:
        return (loop.interrupted is not None or loop.step == loop.stop or loop.every_steps(ck["every_steps"])
                or loop.every_epochs(ck["every_epochs"]))

    def log_metrics(loop) -> None:  # before a checkpoint: a non-finite loss stops the run unsaved
        record = metrics.flush(loop.step, loop.step / steps_per_epoch, env.is_main, lr=current["lr"],
                               momentum=current["momentum"])
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{current['lr']:.2e}",
                        img_s=f"{record['img_per_s']:.0f}", data=f"{record['data_wait_frac']:.0%}")
        log.info("step %d/%d %s", loop.step, total_steps,
                 " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "time")))
        current["record"] = record

    def save(loop) -> None:
        checkpointer.save(loop.step, format=ckpt.FORMAT, arch=m["arch"], student=model.student.state_dict(),
                          teacher=model.teacher.state_dict() if model.teacher is not None else None)

    def knn(loop) -> None:
        result = knn_monitor(model, knn_sets, cfg, run)
        metrics.write({"step": loop.step, "epoch": loop.epoch, **result}, env.is_main)
        log.info("epoch %d k-NN top-1 %.2f top-5 %.2f", loop.epoch, result["knn_top1"], result["knn_top5"])

    def reconstruction(loop) -> None:
        fig = save_reconstruction(model, recon_batch, recon_noise,
                                  out_dir / f"reconstruction_epoch{loop.epoch:04d}.png",
                                  f"{m['arch']} epoch {loop.epoch}")
        log.info("reconstruction figure: %s", fig)

    def at_epoch_end(every: int):  # every `every` epochs and at the end of the run
        return lambda loop: loop.epoch_end and (loop.every_epochs(every) or loop.step == total_steps)

    hooks = [PeriodicHook(lambda loop: checkpoint_due(loop) or loop.every_steps(cfg["log"]["every_steps"]),
                          log_metrics),
             PeriodicHook(checkpoint_due, save),
             FinallyHook(lambda loop: (bar.close(), metrics.close()))]
    if knn_sets:
        hooks.insert(2, PeriodicHook(at_epoch_end(cfg["knn"]["every_epochs"]), knn))
    if env.is_main and cfg["log"]["recon_every_epochs"]:
        hooks.insert(-1, PeriodicHook(at_epoch_end(cfg["log"]["recon_every_epochs"]), reconstruction))
    step = TrainLoop(train_step, start_step, stop_step, steps_per_epoch, hooks).run()
    record = current["record"]

    summary = {"output_dir": str(out_dir), "step": step, "total_steps": total_steps,
               "checkpoint": str(ckpt.find_last_checkpoint(out_dir) or ""),
               "metrics": str(out_dir / "metrics.jsonl"), "last": record}
    if step >= total_steps and env.is_main:
        encoder = ckpt.export_encoder(summary["checkpoint"], cfg["export"]["which"],
                                      out_dir / f"encoder_{cfg['export']['which']}.pth")
        summary.update(encoder=str(encoder), timm_folder=str(encoder.with_suffix("")))
    figs = sorted(out_dir.glob("reconstruction_epoch*.png"))
    summary["reconstruction"] = str(figs[-1]) if figs else ""
    barrier()
    return summary
