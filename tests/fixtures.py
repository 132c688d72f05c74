"""Helpers the tests import (``from fixtures import ...``): paths, the micro pretraining config, miniature
data sets and process utilities. The pytest fixtures themselves live in conftest.py, which builds on these."""
import contextlib
import copy
import io
import logging
import os
import socket
import subprocess
from pathlib import Path

from rcmae.core.config import load_config
from rcmae.pretrain.defaults import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]

MICRO = {"model": dict(arch="vit_micro_patch8", img_size=32, decoder_dim=32, decoder_depth=1,
                       decoder_heads=2),
         "data": dict(source="synthetic", synthetic_size=32, num_workers=0),
         "optim": dict(batch_size=8, base_lr=1.5e-3, epochs=3, warmup_epochs=1),
         "train": dict(micro_batch=8, device="cpu"),
         "checkpoint": dict(every_epochs=1, keep=2),
         "log": dict(every_steps=2, recon_every_epochs=0)}


@contextlib.contextmanager
def logger_as_found():
    """A run's set-up gives the ``rcmae`` logger its own handlers and stops propagation (so that nothing
    prints twice); put it back afterwards, so that ``caplog`` in a later test sees its records."""
    logger = logging.getLogger("rcmae")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        yield
    finally:
        for handler in logger.handlers[:]:
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate, logger.level = propagate, level


@contextlib.contextmanager
def in_checkout():
    """The working directory of the checkout, where the docs' relative paths (``configs/...``) point."""
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def run_in_process(tool, *args) -> subprocess.CompletedProcess:
    """``python tools/<tool>.py ARGS`` as ``tool.main(ARGS)`` in this process, from the checkout: the same
    parsing, checks, run and printed output, without starting an interpreter (and importing torch, timm)
    again. The result as a shell sees the command's: ``sys.exit("error: ...")`` is status 1 with the message
    on stderr, as Python's own exit makes it; any other exception propagates (where the command would
    print a traceback), so it fails the test. For tests whose subject is not the process itself."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    with in_checkout(), logger_as_found(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tool.main([*map(str, args)])
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=err)
                status = 1
            else:
                status = e.code or 0
    return subprocess.CompletedProcess([tool.__name__, *map(str, args)], status, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a run and its DataLoader workers, as SLURM signals them all)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for c in children for p in process_tree(int(c))]


def make_benchmarks(root: Path, imagenet: Path) -> Path:
    """Robustness benchmarks in their real layouts: val (the miniature ImageNet's), -C (2 corruptions x 2
    severities of the val images at 224 x 224, as stored by the benchmark, plus one empty cell), -A (2 of its
    classes: stingray, Persian cat), -Sketch."""
    import shutil

    from PIL import Image

    shutil.copytree(imagenet / "val", root / "val")
    for corruption in ("fog", "saturate"):
        for severity in (1, 2):
            for src in sorted((imagenet / "val").glob("*/*.JPEG"))[::2]:
                dst = root / "c" / corruption / str(severity) / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.open(src).resize((224, 224)).save(dst, quality=85)
    (root / "c" / "snow" / "3" / "n02123045").mkdir(parents=True)  # an empty cell
    for wnid in ("n01498041", "n02123394"):
        (root / "a" / wnid).mkdir(parents=True)
        for src in sorted((imagenet / "val").glob("*/*.JPEG"))[:2]:
            shutil.copy(src, root / "a" / wnid / src.name)
    shutil.copytree(imagenet / "val", root / "sketch")
    return root


def micro_config(out_dir, overrides=()):
    """A micro RC-MAE run (4 steps/epoch on 32 synthetic 32-px images) written to ``out_dir``."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in MICRO.items():
        cfg[section].update(values)
    cfg["train"]["output_dir"] = str(out_dir)
    return load_config(cfg, None, list(overrides))


def make_imagenet(root: Path, per_class: int = 4, size: int = 48) -> Path:
    """A miniature ImageNet laid out like the real one: ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG``,
    crops of scikit-image's real photos under the wnids of the classes they show."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from rcmae.core.data.demo import DEMO_CLASSES

    rng = np.random.default_rng(0)
    for name, wnid in DEMO_CLASSES.items():
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # stereo_motorcycle: (left, right, disp)
        h, w = photo.shape[:2]
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                side = int(min(h, w) * rng.uniform(0.5, 0.9))
                y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                crop.save(root / split / wnid / f"{wnid}_{k:04d}.JPEG", quality=90)
    return root
