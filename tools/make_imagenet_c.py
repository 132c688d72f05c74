#!/usr/bin/env python
"""Generate the ImageNet-C layout (<out>/<corruption>/<severity>/<wnid>/<image>.JPEG) from any
ImageNet-style folder, as the benchmark was made: resize 256, centre crop 224, corrupt, JPEG quality 85.
Resumable (finished files are kept), parallel, with a progress bar. Reproducible: each image's random
draws come from (--seed, corruption, severity, its path under --val), so the files are byte-identical
whatever --workers and however often the run was interrupted. Differences from the released
ImageNet-C: see robustness/imagenet_c.py.

  python tools/make_imagenet_c.py --val /data/imagenet/val --out /data/imagenet-c-regen --workers 16
  python tools/make_imagenet_c.py --val DIR --out DIR --corruptions fog snow --severities 1 5 --seed 1
"""
import argparse
import sys
from pathlib import Path

from rcmae.robustness.metrics import BENCHMARK, EXTRA, SEVERITIES


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val", required=True, help="ImageNet-style folder: <val>/<wnid>/<image>")
    p.add_argument("--out", required=True)
    p.add_argument("--corruptions", nargs="+", default=list(BENCHMARK + EXTRA), choices=list(BENCHMARK + EXTRA),
                   metavar="NAME", help="default: the 15 benchmark corruptions and the 4 extra ones")
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), choices=list(SEVERITIES))
    p.add_argument("--workers", type=int, default=1, help="processes; changes the speed, never the files")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random draw (with the corruption, severity and image path); default 0")
    args = p.parse_args(argv)
    # numpy, PIL, torchvision: after parsing
    from rcmae.core.errors import summarize_names
    from rcmae.robustness.imagenet_c import UNREADABLE_FILE, make_imagenet_c

    try:
        generated = make_imagenet_c(args.val, args.out, args.corruptions, args.severities, args.workers,
                                    seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {generated.written} images under {args.out}")
    if generated.unreadable:
        print(f"skipped {len(generated.unreadable)} unreadable images of --val: "
              f"{summarize_names(list(generated.unreadable))}; listed with the reasons in "
              f"{Path(args.out) / UNREADABLE_FILE}")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
