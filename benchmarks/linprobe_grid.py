#!/usr/bin/env python
"""Wall time of a linear-probe grid of N heads (one backbone pass per batch) against N single runs, one per head,
on the same images and schedule.

  python benchmarks/linprobe_grid.py                                  # CPU: ViT-mini, 64 px, generated images
  python benchmarks/linprobe_grid.py --arch vit_base_patch16 --img-size 224 --images-per-class 128 \\
      --batch 256 --epochs 2 --device cuda --precision bf16 --json grid.json        # a GPU

Each run is ``tools/linprobe.py``'s ``main(cfg)`` from start to end (the set-up, the training steps, every
evaluation, the checkpoints), in this process, on the demo's ImageNet-like tree (4 wnid classes of scikit-image
photo crops, ``rcmae.core.data.demo``, generated once; ``--data`` takes your own); the runs write to /dev/shm
where it exists. The single run of a head is the grid of that one head, which trains it exactly as the grid does
(tests/test_probe_grid.py); MAE's own probe (``grid`` off) is timed too, on the same images. The heads are the
``--base-lrs`` x ``--features`` of the grid. Each round times the grid, the single runs and MAE's probe, the
grid first in even rounds and last in odd ones; the figures are medians over ``--rounds``. The last line reads
``grid speed-up vs N single runs: X.XX (N=8)``: the N single runs' summed time over the grid's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rcmae.core.config import load_config
from rcmae.core.data.demo import build_demo_labelled
from rcmae.finetune.defaults import LINPROBE_DEFAULTS
from rcmae.finetune.train import main as linprobe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a labelled ImageFolder tree with train/ and val/ (default: generate)")
    p.add_argument("--images-per-class", type=int, default=96,
                   help="train images per class of the generated tree (4 classes; val: a quarter)")
    p.add_argument("--arch", default="vit_mini_patch8")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--base-lrs", default="0.03,0.1,0.3,1.0")
    p.add_argument("--features", default="cls,avgpool")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians over them)")
    p.add_argument("--workers", type=int, default=0, help="loader processes per run (default 0: in the main "
                   "process; on 2 cores a worker competes with the compute threads and the times scatter)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    for flag in ("images_per_class", "batch", "epochs", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def timed_run(args, data: Path, out: Path, base_lrs: list[float], features: list[str]) -> float:
    overrides = [f"model.arch={args.arch}", f"model.img_size={args.img_size}", f"data.train_path={data / 'train'}",
                 f"data.val_path={data / 'val'}", f"data.num_workers={args.workers}", f"optim.batch_size={args.batch}",
                 f"optim.epochs={args.epochs}", "optim.warmup_epochs=1", f"train.micro_batch={args.batch}",
                 f"train.device={args.device}", f"train.precision={args.precision}", f"train.output_dir={out}",
                 "eval.every_epochs=1", f"eval.batch_size={args.batch}", "checkpoint.every_epochs=1",
                 "log.every_steps=1000", "grid.held_out_fraction=0.1",
                 f"grid.base_lrs=[{','.join(map(str, base_lrs))}]", f"grid.features=[{','.join(features)}]"]
    cfg = load_config(LINPROBE_DEFAULTS, None, overrides)
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):  # the run's log and bars, apart from the table
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        linprobe(cfg)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    base_lrs = [float(x) for x in args.base_lrs.split(",")]
    features = args.features.split(",")
    heads = [(lr, f) for f in features for lr in base_lrs]
    # outputs in memory where there is /dev/shm: a disk's fsync stalls (seconds on a shared VM) would time the runs
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="linprobe_grid_", dir=shm if shm.is_dir() else None) as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else build_demo_labelled(
            tmp / "data", args.images_per_class, max(1, args.images_per_class // 4))
        grid, single, mae, each = [], [], [], []
        for r in range(args.rounds):  # the grid first in even rounds, last in odd ones: no order favoured
            if r % 2 == 0:
                grid.append(timed_run(args, data, tmp / f"grid_{r}", base_lrs, features))
            each.append([timed_run(args, data, tmp / f"single_{r}_{i}", [lr], [f]) for i, (lr, f) in enumerate(heads)])
            single.append(sum(each[-1]))
            mae.append(timed_run(args, data, tmp / f"mae_{r}", [], []))
            if r % 2 == 1:
                grid.append(timed_run(args, data, tmp / f"grid_{r}", base_lrs, features))
    result = {"heads": len(heads), "arch": args.arch, "img_size": args.img_size, "batch": args.batch,
              "epochs": args.epochs, "device": args.device, "precision": args.precision,
              "threads": torch.get_num_threads(), "grid_s": statistics.median(grid),
              "single_runs_s": statistics.median(single), "mae_single_head_s": statistics.median(mae),
              "speedup": statistics.median(s / g for s, g in zip(single, grid)),
              "rounds": {"grid_s": grid, "single_runs_s": each, "mae_single_head_s": mae}}
    print(f"{args.arch} at {args.img_size} px, batch {args.batch}, {args.epochs} epochs on {args.device} "
          f"({args.precision}), {args.rounds} round(s)")
    print(f"  grid of {len(heads)} heads          {result['grid_s']:8.1f} s")
    print(f"  {len(heads)} single runs, summed     {result['single_runs_s']:8.1f} s "
          f"({result['single_runs_s'] / len(heads):.1f} s each)")
    print(f"  MAE's single head (no grid)  {result['mae_single_head_s']:8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"grid speed-up vs N single runs: {result['speedup']:.2f} (N={len(heads)})")
    return result


if __name__ == "__main__":
    main()
