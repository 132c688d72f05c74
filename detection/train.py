"""ViTDet training and evaluation on detectron2 (one trainer loop with hooks, LazyConfig, AMP)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.engine import (
    AMPTrainer,
    HookBase,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from rcmae.core.launcher import exit_stopped
from rcmae.core.preemption import Interrupted, noting_signals, resume_on_restart, stop_requested
from rcmae.detection.checkpoint import load_detector, load_vit_backbone
from rcmae.detection.data import build_coins_dataset, register_coco
from rcmae.detection.evaluation import COCOEval, write_results
from rcmae.detection.preflight import DEMO_DATA, check_weights, load_config, path_datasets

log = logging.getLogger(__name__)


def register_datasets(cfg, extra: list[tuple[str, str, str]] = ()) -> None:
    """Datasets named in ``cfg.datasets`` and on the command line; ``{demo}`` is the coins set."""
    for name, (json_file, image_root) in path_datasets(cfg, extra).items():
        if DEMO_DATA in json_file or DEMO_DATA in image_root:
            demo = Path(cfg.train.output_dir) / "demo_data"
            if comm.is_main_process():
                build_coins_dataset(demo)
            comm.synchronize()
            json_file, image_root = json_file.format(demo=demo), image_root.format(demo=demo)
        register_coco(name, json_file, image_root)


def do_test(cfg, model, iteration: int | None = None) -> dict:
    """COCO box and mask AP on the test set, each process evaluating its share of the images; every
    process returns the results (detectron2 computes them on the main process only). ``eval_results.json``
    also says what was evaluated: the dataset, its image count, and after which training iteration
    (of ``max_iter``; None for ``--eval-only``)."""
    names = cfg.dataloader.test.dataset.names
    loader = instantiate(cfg.dataloader.test)
    evaluator = COCOEval(names, output_dir=os.path.join(cfg.train.output_dir, "inference"),
                         distributed=comm.get_world_size() > 1)
    results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
        evaluated = {"dataset": names, "images": len(loader.dataset), "iteration": iteration,
                     "max_iter": cfg.train.max_iter if iteration is not None else None}
        write_results(results, cfg.train.output_dir, "eval_results", evaluated)
    return comm.all_gather(results)[0]


def build_model(cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    return model


def wrap_ddp(model, device: str, ddp_options) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, which gives DDP the local GPU as device: a CPU model (gloo)
    takes no device ids."""
    if device == "cpu":
        ddp_options = {**ddp_options, "device_ids": None, "output_device": None}
    return create_ddp_model(model, **ddp_options)


class StopAtSignal(HookBase):
    """After every iteration every process asks whether USR2 or TERM came (one small all-reduce); when
    one did, the main process saves the checkpoint detectron2's PeriodicCheckpointer saves at a period
    (``model_{iter:07d}.pth`` with ``iteration``: ``--resume`` starts at the next one; nothing more if
    that hook saved at this iteration already), the processes wait for it, and all raise
    :class:`Interrupted` (a BaseException: the trainer does not log it as a failure). Registered after
    the LR scheduler and the checkpointer (their state for this iteration is the one saved) and before
    the evaluation (a periodic evaluation due at this iteration is skipped: the time left before the
    job is killed goes to the save). ``signum`` tells the evaluation function after the last iteration
    not to run."""

    def __init__(self, checkpointer: DetectionCheckpointer | None, period: int):
        self.checkpointer, self.period = checkpointer, period
        self.signum: int | None = None

    def after_step(self):
        signum = stop_requested()
        if signum is None:
            return
        self.signum = signum
        iteration, max_iter = self.trainer.iter, self.trainer.max_iter
        # PeriodicCheckpointer (before this hook) saved at a multiple of its period, and model_final at the end
        periodic = (iteration + 1) % self.period == 0 or iteration >= max_iter - 1
        if self.checkpointer is not None and not periodic:
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()  # no process leaves before the checkpoint is written
        stop = Interrupted(signum, f"iteration {iteration + 1} of {max_iter}")
        log.warning("%s: state saved", stop)
        raise stop


def do_train(cfg, resume: bool) -> tuple[torch.nn.Module, dict]:
    """Train; returns the model and the results of its last evaluation (after the last iteration).
    Stops after the iteration in which USR2 or TERM came, saved (:class:`StopAtSignal`)."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    ddp = wrap_ddp(model, cfg.train.device, cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(ddp, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(ddp, cfg.train.output_dir, trainer=trainer)
    main_process = comm.is_main_process()
    evaluations = []
    stopper = StopAtSignal(checkpointer if main_process else None, cfg.train.checkpointer.period)

    def evaluate() -> dict:
        if stopper.signum is not None:  # stopped at the last iteration: the resumed run evaluates
            return {}
        evaluations.append(do_test(cfg, model, min(trainer.iter + 1, cfg.train.max_iter)))
        return evaluations[-1]

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process else None,
        stopper,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main_process else None,
    ])
    start_iter = 0
    if resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load("", resume=True)  # the output dir's last_checkpoint pointer
        start_iter = trainer.iter + 1
        log.info("resumed at iteration %d", start_iter)
    elif cfg.train.init_checkpoint:
        load_vit_backbone(model, cfg.train.init_checkpoint, cfg.train.get("init_which", "auto"))
    else:  # check_weights let it through: train.allow_scratch
        log.info("train.allow_scratch: the backbone starts from random weights")
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except Interrupted:
        # Shut the DataLoader workers down in order now (they never see the signal): the traceback keeps
        # this frame, and so the trainer and its data iterator, alive until the process exits, where
        # multiprocessing would otherwise wait for workers that ignore its TERM.
        trainer.reset_data_loader(lambda: None)
        raise
    return model, evaluations[-1]


def resume_after_restart(cfg, args) -> str | None:
    """:func:`~rcmae.core.preemption.resume_on_restart` for detectron2's command line: a training job SLURM
    restarted resumes from the output directory's last checkpoint (sets ``args.resume``); returns the warning
    to log, or None."""
    restarted = resume_on_restart(cfg.train.output_dir, args.eval_only or args.resume,
                                  lambda out: (out / "last_checkpoint").is_file(), "no --resume",
                                  "resuming from the last checkpoint in")
    args.resume = args.resume or restarted is not None
    return restarted


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    restarted = resume_after_restart(cfg, args)
    check_weights(cfg, args.eval_only, args.resume)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        log.warning("no GPU: training on the CPU without AMP")
        cfg.train.device = "cpu"
        cfg.train.amp.enabled = False
    default_setup(cfg, args)  # logging, seeds, environment info, output_dir/config.yaml
    # our loggers (all under "rcmae"), into the same log.txt and console
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="rcmae")
    if restarted:
        log.warning(restarted)
    return cfg


def main(args) -> dict:
    """Train (and evaluate every ``train.eval_period``), or ``--eval-only`` a detectron2 checkpoint
    (``train.init_checkpoint``, or the output dir's last one with ``--resume``). Training stops at USR2
    or TERM, saved, with :class:`Interrupted`: noted from the start of every process that trains (those
    of detectron2's launch, torchrun's, SLURM's tasks), so that none dies of it before the others save."""
    with noting_signals() if not args.eval_only else contextlib.nullcontext():
        cfg = setup(args)
        register_datasets(cfg, args.dataset or [])
        out = Path(cfg.train.output_dir).resolve()
        if args.eval_only:  # inference needs no DDP wrapper: each process runs its share of the images
            model = build_model(cfg)
            loaded = load_detector(model, cfg.train.init_checkpoint, cfg.train.output_dir, args.resume)
            log.info("evaluating %s", loaded)
            results = do_test(cfg, model)
        else:
            model, results = do_train(cfg, args.resume)  # its EvalHook evaluates after the last iteration
    summary = {"output_dir": str(out), "results": str(out / "eval_results.json"),
               "table": str(out / "eval_results.md"), "metrics": str(out / "metrics.json")}
    if comm.is_main_process():
        summary["visualization"] = str(visualize(cfg, model, out / "predictions.png"))
    summary["box_AP"], summary["mask_AP"] = results["bbox"]["AP"], results["segm"]["AP"]
    comm.synchronize()  # the processes leave together: none tears the group down while another uses it
    return summary


@torch.no_grad()
def visualize(cfg, model, path: Path, max_images: int = 2, threshold: float = 0.5) -> Path:
    """Predictions (score >= threshold: mask, box, score) on the first test images, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    loader = instantiate(cfg.dataloader.test)
    was_training = model.training
    model.eval()
    shown = []
    for batch in loader:
        for inp, out in zip(batch, model(batch)):
            inst = out["instances"].to("cpu")
            shown.append((np.asarray(Image.open(inp["file_name"]).convert("RGB")), inst[inst.scores >= threshold]))
        if len(shown) >= max_images:
            break
    model.train(was_training)
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 5), squeeze=False)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))[:, :3]
    for ax, (img, inst) in zip(axes[0], shown):
        overlay = img.astype(float) / 255
        for i, mask in enumerate(inst.pred_masks.numpy() if inst.has("pred_masks") else []):
            overlay[mask] = 0.5 * overlay[mask] + 0.5 * colors[i % 20]
        ax.imshow(overlay)
        for i, (box, score) in enumerate(zip(inst.pred_boxes.tensor.numpy(), inst.scores.numpy())):
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colors[i % 20], lw=1.5))
            ax.text(x0, y0, f"{score:.2f}", color="white", fontsize=7, backgroundcolor=colors[i % 20])
        ax.set_title(f"{len(inst)} detections (score >= {threshold})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    log.info("predictions drawn in %s", path)
    return path


def launched_main(args) -> dict:
    """``main`` in a process of detectron2's launch (``--num-gpus`` > 1): at a stop at USR2 / TERM the
    main process names the checkpoint and ends with status 128 + the signal, which the launch raises
    (torch's spawn would print the traceback of an uncaught Interrupted and report status 1).

    Its DataLoader workers are forked, as under torchrun or SLURM: a process of the launch inherits the
    launch's ``spawn``, and a spawned worker would start without the signals blocked
    (:mod:`rcmae.core.preemption` blocks them at a fork) and die of the TERM sent to every process,
    failing the step in progress."""
    import multiprocessing

    if not args.eval_only:
        multiprocessing.set_start_method("fork", force=True)
    try:
        return main(args)
    except Interrupted as stop:
        if comm.is_main_process():
            exit_stopped(stop, load_config(args.config_file, args.opts).train.output_dir)
        sys.exit(0)  # the launch reports the main process's status (and would end it, were it not last)


def run_job(job: dict) -> dict:
    """Entry of a SLURM / torchrun task: the process group comes from the environment (one process
    per GPU), then ``main`` as detectron2's own launcher would run it."""
    import argparse

    from rcmae.core.distributed import init_distributed

    args = argparse.Namespace(**job["args"])
    args.resume = args.resume or job["train"].get("resume") == "auto"
    env = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    if env.world_size > 1:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count())))
    return main(args)
