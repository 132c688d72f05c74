import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config  # noqa: E402
from pretrain.train import DEFAULTS  # noqa: E402

MICRO = {"model": dict(arch="vit_micro_patch8", img_size=32, decoder_dim=32, decoder_depth=1,
                       decoder_heads=2),
         "data": dict(source="synthetic", synthetic_size=32, num_workers=0),
         "optim": dict(batch_size=8, base_lr=1.5e-3, epochs=3, warmup_epochs=1),
         "train": dict(micro_batch=8, device="cpu"),
         "checkpoint": dict(every_epochs=1, keep=2),
         "log": dict(every_steps=2, recon_every_epochs=0)}


def micro_config(out_dir, overrides=()):
    """A micro RC-MAE run (4 steps/epoch on 32 synthetic 32-px images) written to ``out_dir``."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in MICRO.items():
        cfg[section].update(values)
    cfg["train"]["output_dir"] = str(out_dir)
    return load_config(cfg, None, list(overrides))


@pytest.fixture
def micro_cfg(tmp_path):
    return lambda *overrides, out="run": micro_config(tmp_path / out, overrides)
