#!/usr/bin/env python
"""ViTDet Mask R-CNN on COCO-format data with detectron2, from RC-MAE / MAE backbones.

  python tools/train_det.py                          # CPU demo (no arguments, or --demo): demo_tiny.py on `coins`
  python tools/train_det.py --demo train.init_checkpoint=output/demo_pretrain/checkpoint_00000640.pth
  python tools/train_det.py --config-file configs/detection/mask_rcnn_vitdet_b_100ep.py --num-gpus 8 \\
      train.init_checkpoint=output/rcmae_vit_base/checkpoint_....pth
  python tools/train_det.py --config-file ... --eval-only train.init_checkpoint=output/vitdet_b_100ep/model_final.pth
  python tools/train_det.py --config-file ... --slurm --nodes 8 --gpus-per-node 8 --partition P --timeout 4320
  python tools/train_det.py --config-file detection/mask_rcnn_vitdet_b_100ep --dry-run ...  # checks + plan only
  # any COCO-format set: --dataset NAME JSON IMAGE_ROOT dataloader.train.dataset.names=NAME ...
"""
import argparse
import os
import signal
import sys
from pathlib import Path

from rcmae.core.config import config_path
from rcmae.core.launcher import HelpFormatter, add_launch_args, slurm_world_size

DEMO = config_path("detection/demo_tiny.py")


def parse_args(argv=None):
    """detectron2's ``default_argument_parser`` options (same names and meaning), ours, and the
    cluster launch; built without importing detectron2, so ``--help`` is instant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="a LazyConfig file, or a shipped one by name from any directory "
                        "(configs/detection/demo_tiny.py, detection/demo_tiny)")
    p.add_argument("--resume", action="store_true", help="continue from the output directory's last checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate train.init_checkpoint, no training")
    p.add_argument("--num-gpus", type=int, default=1, help="processes on this machine (detectron2's launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="rendezvous of detectron2's launch; auto: a free local port")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key.sub=value")
    p.add_argument("--dataset", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format dataset (repeatable)")
    p.add_argument("--demo", action="store_true", help=f"the CPU demo ({DEMO.name}); also what a call "
                   "without arguments runs. Takes overrides: --demo train.init_checkpoint=PATH")
    add_launch_args(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.demo or not argv:
        if args.config_file:
            p.error("--demo runs the demo config; drop --demo to use --config-file")
        args.config_file = str(DEMO)
    elif not args.config_file:  # never fall back to the demo with real settings
        p.error("--config-file is required (e.g. configs/detection/mask_rcnn_vitdet_b_100ep.py), or --demo for "
                "the CPU demo, which takes overrides too (--demo train.init_checkpoint=PATH)")
    if args.num_machines > 1 and args.dist_url == "auto" and not args.slurm:
        p.error("--num-machines > 1 needs --dist-url tcp://<machine 0's address>:<port>")
    return args


def world_size(args) -> int:
    """Processes the run will have: SLURM tasks (one per GPU), torchrun's, or detectron2's launch."""
    if args.slurm:
        return slurm_world_size(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.num_gpus * args.num_machines


def run(argv=None):
    args = parse_args(argv)
    from detectron2.engine import launch as d2_launch
    from torch.multiprocessing import ProcessExitedException

    from rcmae.core.errors import CheckpointError, ConfigError
    from rcmae.core.launcher import exit_stopped, launch
    from rcmae.core.preemption import JOB_SIGNALS, Interrupted, noting_signals
    from rcmae.detection.data import DatasetError
    from rcmae.detection.preflight import check_run, load_config, run_plan
    from rcmae.detection.train import launched_main, run_job
    from rcmae.detection.train import main as train

    try:
        # a shipped name works from any directory; the processes and tasks get the absolute path
        args.config_file = str(config_path(args.config_file).resolve())
        cfg = load_config(args.config_file, args.opts)
        run_args = dict(eval_only=args.eval_only, resume=args.resume, world_size=world_size(args),
                        extra_datasets=args.dataset or [])
        check_run(cfg, **run_args)
        if args.dry_run:  # the checks passed: the plan (with --slurm, the job's sbatch options follow)
            print(run_plan(cfg, config_file=args.config_file, **run_args))
            if not args.slurm:
                return None
        if args.slurm:  # one task per GPU through submitit, requeued + resumed on timeout
            out = str(Path(cfg.train.output_dir).resolve())  # the tasks may start elsewhere
            args.opts = [*args.opts, f"train.output_dir={out}"]
            keep = ("config_file", "resume", "eval_only", "opts", "dataset", "num_gpus",
                    "num_machines", "machine_rank", "dist_url")
            job = {"args": {k: getattr(args, k) for k in keep}, "train": {"output_dir": out, "resume": None}}
            return launch("rcmae.detection.train:run_job", job, args, name="vitdet")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
            return run_job({"args": vars(args), "train": {}})
        if args.num_gpus * args.num_machines <= 1:
            result = train(args)
        else:  # detectron2's launcher: one process per GPU on this machine
            with noting_signals():  # this process outlives a TERM / USR2 sent to the whole group
                result = d2_launch(launched_main, args.num_gpus, num_machines=args.num_machines,
                                   machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except (CheckpointError, ConfigError, DatasetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except Interrupted as stop:  # USR2 / TERM: saved, stopped (one process, or a torchrun rank)
        if int(os.environ.get("RANK", "0")) == 0:
            exit_stopped(stop, cfg.train.output_dir)
        sys.exit(128 + stop.signum)
    except ProcessExitedException as e:  # a process of detectron2's launch stopped at USR2 / TERM
        signum = e.exit_code - 128 if e.exit_code > 0 else -e.exit_code
        if signum not in JOB_SIGNALS:
            raise
        if e.exit_code < 0:  # killed before it could note the signal (still starting): nothing saved
            print(f"\nprocess {e.error_index} ended by {signal.Signals(signum).name} before training",
                  file=sys.stderr)
        sys.exit(128 + signum)  # the main process of the launch named the saved checkpoint
    if isinstance(result, dict):
        print("\ndone. outputs:")
        for key, value in result.items():
            print(f"  {key:15s} {value}")
    return result


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    run()
