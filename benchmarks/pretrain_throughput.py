#!/usr/bin/env python
"""Throughput of the real pretraining step (rcmae.core.engine.TrainStep) on synthetic images, or end to
end from a JPEG folder (``--data``): read, decode, augment, copy, step.

  python benchmarks/pretrain_throughput.py                         # ViT-B/16, 224 px, batch 256
  python benchmarks/pretrain_throughput.py --precision fp16 --compile --json out.json
  python benchmarks/pretrain_throughput.py --data /imagenet/train --workers 16 --pipeline fast   # end to end
  python benchmarks/pretrain_throughput.py --arch vit_micro_patch8 --img-size 32 --batch 16 \
      --steps 5 --warmup 2 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2   # CPU smoke run

Each --gamma-values entry builds a fresh model (gamma > 0: RC-MAE with its EMA teacher,
gamma = 0: plain MAE) and times --steps optimizer steps of one --batch micro-batch each, after
--warmup steps. FLOPs are counted on one extra, untimed step; MFU divides the achieved rate by a
matmul peak measured in the same run, so it is relative to what this machine really delivers.
Running RC-MAE and MAE in one process gives the teacher overhead as one ratio. With ``--data`` the
images come from the training input pipeline (``data.pipeline``: fast, torchvision or gpu; ``--workers``
loader processes), and ``data_wait`` is the share of the step spent waiting for them: near 0 the run is
compute-bound, near 1 data-bound.

For comparison, the official RC-MAE step on one H200 runs ~2,519 img/s (fused, bf16; ViT-B/16,
batch 256), and MAE alone 3,203 img/s (fp16).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.folder import list_images
from rcmae.core.data.pipelines import PIPELINES, collate_for, model_input, pretrain_transform
from rcmae.core.data.sampler import train_batches
from rcmae.core.data.shards import is_shard_dir, load_index
from rcmae.core.engine import TrainStep
from rcmae.core.optim import build_pretrain_optimizer
from rcmae.core.run import AMP_DTYPES, resolve_precision
from rcmae.core.vit import ARCHS
from rcmae.pretrain.defaults import DEFAULTS
from rcmae.pretrain.models import build_mae
from rcmae.pretrain.rcmae import METRICS, RCMAE, mask_noise

OPTIM = DEFAULTS["optim"]
SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16", choices=sorted(ARCHS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="images per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (and compilation)")
    p.add_argument("--precision", default="auto", choices=["auto", *AMP_DTYPES],
                   help="auto: bf16 on cuda, fp32 on cpu (as training does)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward, as train.compile")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--gamma-values", default="1.0,0.0", help="comma-separated; 0 = MAE (no teacher)")
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="end to end from this ImageFolder tree (or shard folder) instead of synthetic images")
    p.add_argument("--pipeline", default="fast", choices=PIPELINES, help="with --data: data.pipeline")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="with --data: loader processes")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, amp_dtype) -> float:
    """Measured dense-matmul rate: the denominator of MFU. fp32 on cuda runs as tf32 (flags set)."""
    n, reps = (8192, 20) if device.type == "cuda" else (2048, 5)
    dtype = amp_dtype if device.type == "cuda" and amp_dtype is not None else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def bench_gamma(args, gamma: float, device: torch.device, amp_dtype, peak: float) -> dict:
    torch.manual_seed(SEED)
    student = build_mae(args.arch, args.img_size, args.decoder_dim, args.decoder_depth, args.decoder_heads)
    model = RCMAE(student, gamma=gamma).to(device)
    optimizer, _ = build_pretrain_optimizer(model.student, OPTIM["weight_decay"], OPTIM["betas"], device.type)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    forward = torch.compile(model) if args.compile else model
    step_fn = TrainStep(model, forward, optimizer, amp_dtype, device, None, scaler, on_update=model.update_teacher,
                        metric_keys=METRICS)
    synthetic = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    batches = input_batches(args, device) if args.data else None
    lr, momentum, step = OPTIM["base_lr"] * args.batch / 256, DEFAULTS["rcmae"]["momentum"], 0

    def run_step(fn):
        nonlocal step
        imgs = model_input(next(batches)[0], device, args.img_size) if batches else synthetic
        fn([(imgs, mask_noise(SEED, step, args.batch, student.num_patches, device, False))], lr, [momentum])
        step += 1

    # FLOPs of one step, counted in eager mode (compile fuses elementwise ops, not the matmuls).
    # On CPU the fused attention kernel is not in the counter's table, so count the math path.
    with FlopCounterMode(display=False) as counter, \
            (sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()):
        run_step(TrainStep(model, model, optimizer, amp_dtype, device, None, scaler, on_update=model.update_teacher,
                           metric_keys=METRICS))
    flops = counter.get_total_flops()

    for _ in range(args.warmup):
        run_step(step_fn)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if batches:
        batches.take_wait()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run_step(step_fn)
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    data_wait = batches.take_wait() / (step_s * args.steps) if batches else 0.0

    if device.type == "cuda":
        mem_gib, mem_kind = torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda max allocated"
    else:  # ru_maxrss (KiB on Linux) is the process high-water mark, so it includes earlier runs
        mem_gib, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process max RSS"
    achieved = flops / step_s / 1e12
    return {"gamma": gamma, "mode": "RC-MAE" if model.teacher is not None else "MAE",
            "img_per_s": args.batch / step_s, "step_ms": step_s * 1e3, "gflop_per_step": flops / 1e9,
            "tflops": achieved, "mfu": achieved / peak, "mem_gib": mem_gib, "mem_kind": mem_kind,
            "data_wait": data_wait}


def input_batches(args, device: torch.device):
    """The training input pipeline over ``args.data`` (one process, one micro-batch per step)."""
    if is_shard_dir(args.data):
        sources = load_index(args.data)[0]
    else:
        sources = list_images(args.data, "--data")
    transform = pretrain_transform(args.img_size, DEFAULTS["data"]["crop_min_scale"], args.pipeline)
    collate = collate_for(args.pipeline)
    return train_batches(SeededImages(sources, transform), args.batch, 1, 1, 0, SEED, 0, args.workers,
                         device.type == "cuda" and collate is None, collate)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(device_type)
    precision, amp_dtype = resolve_precision(args.precision, device_type)
    name = (torch.cuda.get_device_name(device) if device_type == "cuda"
            else f"cpu x{torch.get_num_threads()} threads")

    peak = matmul_peak_tflops(device, amp_dtype)
    results = [bench_gamma(args, float(g), device, amp_dtype, peak) for g in args.gamma_values.split(",")]

    source = (f"end to end from {args.data} ({args.pipeline} pipeline, {args.workers} workers)" if args.data
              else "synthetic images")
    print(f"\n{args.arch} {args.img_size}px, batch {args.batch}, {precision}"
          f"{', compiled' if args.compile else ''}, {name}; matmul peak {peak:.3g} TFLOP/s; {source}")
    print(f"{'mode':<7}{'gamma':>6}{'img/s':>10}{'step ms':>10}{'GFLOP/step':>12}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'mem GiB':>9}{'data wait':>10}  memory")
    for r in results:
        print(f"{r['mode']:<7}{r['gamma']:>6g}{r['img_per_s']:>10.1f}{r['step_ms']:>10.1f}"
              f"{r['gflop_per_step']:>12.4g}{r['tflops']:>9.3g}{r['mfu']:>7.1%}{r['mem_gib']:>9.2f}"
              f"{r['data_wait']:>10.0%}  {r['mem_kind']}")
    by_mode = {r["mode"]: r for r in results}
    overhead = None
    if {"RC-MAE", "MAE"} <= by_mode.keys():
        overhead = by_mode["MAE"]["img_per_s"] / by_mode["RC-MAE"]["img_per_s"]
        print(f"teacher overhead: MAE img/s / RC-MAE img/s = {overhead:.3f}")

    report = {"args": vars(args), "precision": precision, "device": name, "peak_tflops": peak,
              "results": results, "teacher_overhead": overhead}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
