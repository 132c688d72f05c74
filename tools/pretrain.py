#!/usr/bin/env python
"""RC-MAE / MAE pretraining.

  python tools/pretrain.py                                   # the CPU demo (configs/pretrain/demo.yaml)
  python tools/pretrain.py --config-file configs/pretrain/rcmae_vit_base.yaml data.path=/imagenet/train
  torchrun --nproc-per-node 8 tools/pretrain.py --config-file ... train.micro_batch=128
  python tools/pretrain.py --config-file ... --slurm --nodes 4 --gpus-per-node 8 --partition P --timeout 4320
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.launcher import add_launch_args, launch  # noqa: E402
from pretrain.train import DEFAULTS, NonFiniteLossError, main  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, help=f"YAML config (default: the demo, {DEMO.name})")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the output dir's last checkpoint (default behaviour), or from PATH "
                        "(ours, or an official MAE / RC-MAE checkpoint)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument("--output-dir", default=None, help="same as train.output_dir=...")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    add_launch_args(p)
    return p.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    if args.no_resume:
        overrides.append("train.resume=none")
    try:
        cfg = load_config(DEFAULTS, args.config_file or DEMO, overrides)
        result = launch(main, cfg, args, name="rcmae-pretrain")
    except (ConfigError, CheckpointError, FileNotFoundError, NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    if isinstance(result, dict):
        print("\ndone. outputs:")
        for key in ("output_dir", "checkpoint", "encoder", "metrics", "reconstruction"):
            if result.get(key):
                print(f"  {key:15s} {result[key]}")
    return result


if __name__ == "__main__":
    run()
