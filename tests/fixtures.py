"""Helpers the tests import (``from fixtures import ...``): paths, the micro pretraining config, miniature
data sets and process utilities. The pytest fixtures themselves live in conftest.py, which builds on these."""
import copy
import socket
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
