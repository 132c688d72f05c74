#!/usr/bin/env python
"""Benchmark backbones on every downstream protocol and write the report card (report.md / .html / .json).

  python tools/benchmark.py                                     # the CPU demo: a few minutes on 2 cores
  python tools/benchmark.py rcmae_b=output/rcmae_vit_base mae_b=mae_pretrain_vit_base_full.pth \\
      --preset paper --imagenet /data/imagenet --coco /data/coco --imagenet-c /data/imagenet-c \\
      --imagenet-a /data/imagenet-a --imagenet-r /data/imagenet-r --imagenet-sketch /data/imagenet-sketch/sketch \\
      --output output/bench_vit_b --launcher slurm --nodes 4 --gpus-per-node 8 --partition P --dry-run
  python tools/benchmark.py ... (the same command without --dry-run)   # submits, with afterok dependencies
  python tools/benchmark.py --output output/bench_vit_b --status      # each job's state, progress, numbers

A backbone is [NAME=]PATH (a pretraining run directory or checkpoint: ours, official MAE / RC-MAE, an
exported encoder, a timm state dict) or [NAME=]random:ARCH[@IMG_SIZE]. The plan: export -> cost, k-NN,
linear probe, fine-tuning, detection; fine-tuning -> robustness. Each job is its tool's command line, in
<output>/<backbone>/<protocol>/. Running the same command again skips finished jobs, leaves queued ones,
continues interrupted ones and runs failed ones again; a backbone added later joins the same report.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rcmae.core.launcher import HelpFormatter

PROTOCOLS = "knn,linprobe,finetune,detection,robustness"
DATA = ("imagenet", "coco", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="rcmae-benchmark", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("backbones", nargs="*", help="[NAME=]PATH or [NAME=]random:ARCH[@IMG_SIZE]")
    p.add_argument("--demo", action="store_true", help="the CPU demo; also what a call without arguments runs")
    p.add_argument("--preset", default="paper", help="paper, quick, demo, or a YAML file (configs/benchmark/)")
    p.add_argument("--protocols", default=PROTOCOLS, help="comma-separated")
    p.add_argument("--detection", default="vitdet", choices=("vitdet", "paper"),
                   help="ViTDet (Li et al.) or the paper's FPN protocol (Li et al. 2021 benchmark)")
    p.add_argument("--override", action="append", default=[], metavar="JOB:KEY=VALUE",
                   help="a config override for one kind of job (knn, linprobe, finetune, detection, robustness, "
                        "cost), e.g. finetune:optim.epochs=50 (repeatable)")
    g = p.add_argument_group("data (laid out as distributed)")
    g.add_argument("--imagenet", metavar="DIR", help="train/ and val/ wnid folders")
    g.add_argument("--coco", metavar="DIR", help="annotations/instances_{train,val}2017.json, train2017/, val2017/")
    g.add_argument("--imagenet-c", metavar="DIR", help="corruption/severity/wnid")
    for name in ("a", "r", "sketch"):
        g.add_argument(f"--imagenet-{name}", metavar="DIR", help="wnid folders")
    g = p.add_argument_group("what to do")
    g.add_argument("--output", default="output/benchmark", help="the benchmark's folder (one per benchmark)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and run every job's checks; run, write "
                   "or submit nothing")
    g.add_argument("--status", action="store_true", help="each job's state, progress and numbers; rewrite the report")
    g.add_argument("--report", action="store_true", help="only rewrite the report from the job folders")
    g = p.add_argument_group("launch")
    g.add_argument("--launcher", default="local", choices=("local", "torchrun", "slurm"),
                   help="local: each job here in turn; torchrun: each on --nproc-per-node processes; "
                        "slurm: submitted with dependencies")
    g.add_argument("--nproc-per-node", type=int, default=8)
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=None)
    g.add_argument("--timeout", type=int, default=72 * 60, help="minutes, where the preset does not say")
    for key in ("partition", "account", "qos", "constraint"):
        g.add_argument(f"--{key}")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option for every job (repeatable)")
    args = p.parse_args(argv)
    args.demo = args.demo or not argv
    return args


def overrides_by_job(items: list[str]) -> dict[str, list[str]]:
    from rcmae.core.errors import ConfigError

    out: dict[str, list[str]] = {}
    for item in items:
        job, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--override {item!r}: write JOB:KEY=VALUE, e.g. finetune:optim.epochs=50")
        out.setdefault(job, []).append(override)
    return out


def run(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from rcmae.benchmark.plan import SLURM_KEYS, DataRoots, Launch, Settings, read_backbone
    from rcmae.benchmark.suite import benchmark, demo_inputs
    from rcmae.core.errors import CheckpointError, ConfigError, OutputDirInUseError

    out = Path(args.output if not (args.demo and args.output == "output/benchmark") else "output/benchmark_demo")
    try:
        specs, data = args.backbones, DataRoots(**{k: getattr(args, k) for k in DATA})
        if args.demo:
            if specs or any(vars(data).values()):
                raise ConfigError("--demo brings its own backbones and data: drop --demo to benchmark yours")
            args.preset = "demo" if args.preset == "paper" else args.preset
            if args.dry_run:
                raise ConfigError("the demo builds its data and pretrains its backbone before it plans; --dry-run "
                                  "checks a benchmark of your backbones and data")
            specs, data = demo_inputs(out) if not (args.status or args.report) else ([], data)
        elif not specs and not (args.status or args.report):
            raise ConfigError("name the backbones to benchmark ([NAME=]PATH ...), or --status / --report with "
                              "--output; without arguments the demo runs")
        slurm = {k: getattr(args, k) for k in SLURM_KEYS}  # every job's launch options (a preset may lower them)
        if args.slurm_param:
            slurm["slurm_param"] = args.slurm_param
        launch = Launch(args.launcher, args.nproc_per_node if args.launcher == "torchrun" else 1, slurm)
        settings = Settings([p.strip() for p in args.protocols.split(",") if p.strip()], args.detection,
                            args.preset, data.resolved(), overrides_by_job(args.override))
        backbones = [read_backbone(spec) for spec in specs]
        return benchmark(backbones, settings, launch, out, dry_run=args.dry_run, status=args.status,
                         report_only=args.report, cmd=shlex.join(["rcmae-benchmark", *argv]))
    except (ConfigError, CheckpointError, OutputDirInUseError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"\ninterrupted: {e or 'stopped'}. Run the same command again to continue.")


def main(argv=None) -> None:
    """The console script: exit status 0 when every job finished or is under way, 1 when one failed."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
