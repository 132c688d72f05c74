#!/usr/bin/env python
"""Export the encoder of a pretraining checkpoint (ours, official MAE or official RC-MAE) in timm's
VisionTransformer key names: ``OUTPUT`` (a .pth file) as ``{"model": state_dict, "meta": {...}}`` (MAE-style
loaders) and the folder ``OUTPUT`` without .pth as timm writes it (config.json + model.safetensors). Nothing is
written unless both can be.

  python tools/export_encoder.py output/pretrain/checkpoint_00000100.pth encoder.pth [--which student]
  # then: timm.create_model("local-dir:encoder", pretrained=True)   # right mean / std / crop included
"""
from __future__ import annotations

import argparse
import logging
import sys

from rcmae.core.errors import CheckpointError, ConfigError


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("output", help="the .pth file to write; the timm folder goes beside it, named without .pth")
    p.add_argument("--which", default="teacher", choices=["teacher", "student", "auto"],
                   help="teacher (default; RC-MAE transfers the teacher), student, or auto "
                        "(teacher if the checkpoint has one, else its only model)")
    args = p.parse_args(argv)
    from rcmae.core.checkpoint import export_encoder  # torch: after the arguments parse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_encoder(args.checkpoint, args.which, args.output)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(out)


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
