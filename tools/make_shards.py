#!/usr/bin/env python
"""Write an ImageFolder tree (``FOLDER/<class>/<image>``) as tar shards of about --shard-size-mb each plus the
``index.json`` our data loading reads them through by random access (webdataset readers can stream the same
shards). For cluster file systems that serve a few large files far better than 1.28M small ones.

  python tools/make_shards.py /imagenet/train /shards/imagenet-train --shard-size-mb 1024
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="an ImageFolder tree: FOLDER/<class>/<image>")
    p.add_argument("output", help="the shard folder to write (shard-NNNNNN.tar, index.json)")
    p.add_argument("--shard-size-mb", type=float, default=1024,
                   help="about this many MiB per shard (default 1024); an image is never split across shards")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shard set OUTPUT already holds (without it, OUTPUT must be new or empty)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway off a terminal)")
    args = p.parse_args(argv)
    if args.shard_size_mb <= 0:
        p.error(f"--shard-size-mb must be positive, got {args.shard_size_mb}")
    from rcmae.core.data.shard_writer import write_shards
    from rcmae.core.data.shards import ShardError, load_index  # numpy, PIL: after the arguments parse
    from rcmae.core.errors import summarize_names

    start = time.perf_counter()
    try:
        written = write_shards(args.folder, args.output, shard_bytes=int(args.shard_size_mb * 2**20),
                               overwrite=args.overwrite, progress=not args.no_progress)
        members, _, classes = load_index(written.index.parent)
    except (FileNotFoundError, FileExistsError, ShardError) as e:
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - start
    shards = sorted({m.shard for m in members})
    total = sum(Path(s).stat().st_size for s in shards)
    print(f"wrote {len(shards)} shards, {len(members)} samples of {len(classes)} classes, "
          f"{total / 2**20:.1f} MiB in {seconds:.1f} s: {written.index}")
    if written.skipped:
        shown = summarize_names([f"{name} ({why})" for name, why in written.skipped.items()])
        print(f"skipped {len(written.skipped)} unreadable images: {shown}; listed with the reasons in "
              f"{written.index} under 'skipped'")


def main(argv=None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(argv)


if __name__ == "__main__":
    main()
