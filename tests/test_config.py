from pathlib import Path

import pytest

from rcmae.core.config import config_path, load_config
from rcmae.core.errors import ConfigError
from rcmae.pretrain.defaults import DEFAULTS
from rcmae.pretrain.train import validate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULTS, None, ["optim.learning_rate=1"])
    assert "optim.learning_rate" in str(e.value) and "optim.base_lr" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.depth'"):
        load_config(DEFAULTS, bad)


def test_overrides_are_typed():
    cfg = load_config(DEFAULTS, None, ["optim.base_lr=3e-4", "optim.epochs=10", "optim.lr=2e-3",
                                       "train.stop_at_step=5", "optim.betas=[0.9,0.99]"])
    assert cfg["optim"]["base_lr"] == 3e-4 and cfg["optim"]["epochs"] == 10
    assert cfg["optim"]["lr"] == 2e-3  # no default type to go by: still a float
    assert cfg["optim"]["betas"] == [0.9, 0.99] and cfg["train"]["stop_at_step"] == 5
    with pytest.raises(ConfigError, match="optim.epochs must be int"):
        load_config(DEFAULTS, None, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DEFAULTS, None, ["optim.epochs"])
    assert DEFAULTS["optim"]["epochs"] == 1600  # defaults untouched


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path, imagenet):
    cfg = load_config(DEFAULTS, path, [] if path.stem == "demo" else [f"data.path={imagenet / 'train'}"])
    assert validate(cfg, world=1) >= 1
    if path.stem != "demo":  # the published recipe
        o = cfg["optim"]
        assert (o["batch_size"], o["base_lr"], o["warmup_epochs"]) == (4096, 1.5e-4, 40)
        assert o["epochs"] in (800, 1600) and o["betas"] == [0.9, 0.95] and o["weight_decay"] == 0.05
        assert cfg["model"]["norm_pix_loss"] and cfg["model"]["mask_ratio"] == 0.75
        assert cfg["rcmae"]["gamma"] == (0.0 if path.stem.startswith("mae") else 1.0)


def test_batch_must_split_over_processes(imagenet):
    cfg = load_config(DEFAULTS, None, [f"data.path={imagenet / 'train'}", "train.micro_batch=64"])
    assert validate(cfg, world=8) == 8  # 4096 = 64 x 8 processes x 8 accumulation steps
    with pytest.raises(ConfigError, match="multiple of train.micro_batch"):
        validate(cfg, world=3)
    with pytest.raises(ConfigError, match="needs data.path"):
        validate(load_config(DEFAULTS), world=1)
    with pytest.raises(ConfigError, match="export.which=student"):
        validate(load_config(DEFAULTS, None, [f"data.path={imagenet / 'train'}", "rcmae.gamma=0"]), world=1)


def test_demo_data_with_a_data_path_is_refused(imagenet, tmp_path):
    demo = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"
    with pytest.raises(ConfigError, match="data.source=demo makes its own images and would ignore data.path"):
        validate(load_config(DEFAULTS, demo, [f"data.path={imagenet / 'train'}"]), world=1)
    with pytest.raises(FileNotFoundError, match="data.path: image folder .*nope does not exist"):
        validate(load_config(DEFAULTS, None, [f"data.path={tmp_path / 'nope'}"]), world=1)
    with pytest.raises(FileNotFoundError, match="train.init: checkpoint .*none.pth does not exist"):
        validate(load_config(DEFAULTS, None, [f"data.path={imagenet / 'train'}",
                                              f"train.init={tmp_path / 'none.pth'}"]), world=1)


def test_model_size_checks(imagenet):
    with pytest.raises(ConfigError, match="img_size=100 is not a multiple of the patch size 16"):
        validate(load_config(DEFAULTS, None, [f"data.path={imagenet / 'train'}", "model.img_size=100"]), world=1)
    with pytest.raises(ConfigError, match="unknown model.arch 'vit_giant'"):
        validate(load_config(DEFAULTS, None, [f"data.path={imagenet / 'train'}", "model.arch=vit_giant"]), world=1)


def test_dataset_root_instead_of_train_split_is_refused(tmp_path):
    from rcmae.core.data.folder import list_images

    for split in ("train", "val"):
        (tmp_path / split / "n01440764").mkdir(parents=True)
        (tmp_path / split / "n01440764" / "a.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="looks like a dataset root"):
        list_images(tmp_path)
    assert len(list_images(tmp_path / "train")) == 1


def test_a_mistyped_config_name_gets_the_close_shipped_names():
    """Detection's LazyConfig files are shipped configs too: a typo in one is answered with its name."""
    with pytest.raises(ConfigError, match=r"did you mean detection/demo_tiny\b.*shipped: .*detection/mask_rcnn_vitdet_b_100ep"):
        config_path("detection/demo_tiyn")
