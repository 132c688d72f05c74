"""Check before write (issue 19): every tool refuses a bad config with a sentence naming the key, before it
creates anything (output directory, runs.jsonl, logs, demo data, SLURM job folder), in every launch mode: one
process, torchrun (its environment variables), --slurm and --slurm --dry-run. The config tools check in one
place, run_cli (rcmae/core/launcher.py: check_run_config, then the tool's validate), before they launch;
start_run repeats it for a main called from Python. The tools run in this process, through their main(argv)."""
import pytest

from rcmae.core.errors import ConfigError
from rcmae.tools import (
    analyze_teacher,
    eval_robustness,
    export_encoder,
    finetune,
    knn,
    linprobe,
    make_imagenet_c,
    make_shards,
    pretrain,
    visualize,
)

MISSING = "/nonexistent/rcmae-check-before-write"

# (tool, arguments, what the error names): the run_cli tools, each with a bad value and a missing folder
CONFIG_TOOLS = [
    (pretrain, ["--demo", "rcmae.teacher_mask=other"], "rcmae.teacher_mask"),
    (pretrain, ["data.source=folder", f"data.path={MISSING}"], "data.path"),
    (pretrain, ["--demo", "train.precision=fp8"], "train.precision"),
    (finetune, ["--demo", "optim.name=adam"], "optim.name"),
    (finetune, [f"data.train_path={MISSING}", f"data.val_path={MISSING}"], "data.train_path"),
    (linprobe, ["--demo", "model.global_pool=max"], "model.global_pool"),
    (knn, ["--demo", "knn.pool=avg"], "knn.pool"),
    (knn, ["--demo", "init.which=both"], "init.which"),
    (knn, ["--demo", "train.device=gpu"], "train.device"),
    (eval_robustness, ["--demo", "model.preprocessing=torchvision"], "model.preprocessing"),
    (eval_robustness, ["--imagenet-val", MISSING, "--model", "resnet18"], "data.imagenet_val"),
    (eval_robustness, ["--imagenet-val", MISSING], "model.checkpoint"),
    (analyze_teacher, ["sections=[plots]"], "sections"),
    (pretrain, ["--demo", "optim.epochs=0"], "optim.epochs"),                # numbers a run cannot use
    (finetune, ["--demo", "optim.lr=fast"], "optim.lr"),                     # None by default: typed here
    (linprobe, ["--demo", "train.stop_at_step=1.5"], "train.stop_at_step"),
    (knn, ["--demo", "data.crop_pct=1.2"], "data.crop_pct"),
    (knn, ["--demo", "data.label_space=wordnet"], "data.label_space"),
    (finetune, ["--demo", "aug.rand_augment=rand-x9", "optim.batch_size=64"], "aug.rand_augment"),
]
MODES = {"plain": [], "slurm": ["--slurm", "--gpus-per-node", "1"],
         "slurm-dry-run": ["--slurm", "--gpus-per-node", "1", "--dry-run"], "torchrun": []}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (relative default paths land here), and the output directory to be
    refused under it; the test checks the working directory is still empty after the refusal."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return cwd


def refused(tool, argv, key, cwd):
    with pytest.raises(SystemExit) as stop:
        tool.main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and key in message, message
    assert list(cwd.iterdir()) == [], f"{tool.__name__} wrote {sorted(cwd.rglob('*'))} before refusing"
    return message


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tool, args, key", CONFIG_TOOLS,
                         ids=[f"{t.__name__.rsplit('.', 1)[-1]}-{k}" for t, _, k in CONFIG_TOOLS])
def test_config_tools_check_before_they_write(tool, args, key, mode, workdir, monkeypatch):
    if mode == "torchrun":  # rank 0 of 2, as torchrun starts it: refused before the process group forms
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "1"}.items():
            monkeypatch.setenv(name, value)
    refused(tool, [*args, "train.output_dir=out/run", *MODES[mode]], key, workdir)


def test_the_check_names_the_expected_values(workdir):
    message = refused(finetune, ["--demo", "optim.name=adam", "train.output_dir=out"], "optim.name", workdir)
    assert "'adamw', 'lars', 'sgd'" in message and "'adam'" in message
    message = refused(pretrain, ["--demo", "train.device=gpu", "train.output_dir=out"], "train.device", workdir)
    assert "'auto', 'cpu', 'cuda'" in message


def test_mains_called_from_python_check_before_they_write(tmp_path):
    """start_run checks (check_run_config, then the tool's validate) before it creates the output directory."""
    from rcmae.analysis.defaults import DEFAULTS as ANALYSIS_DEFAULTS
    from rcmae.analysis.mean_teacher import main as analysis_main
    from rcmae.core.config import load_config
    from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
    from rcmae.finetune.train import main as finetune_main
    from rcmae.robustness.defaults import DEFAULTS as ROBUSTNESS_DEFAULTS
    from rcmae.robustness.evaluate import main as robustness_main

    out = tmp_path / "out"
    for main, defaults, demo, override in (
            (analysis_main, ANALYSIS_DEFAULTS, "analysis/demo.yaml", "sections=[plots]"),
            (finetune_main, FT_DEFAULTS, "finetune/demo.yaml", "optim.name=adam"),
            (robustness_main, ROBUSTNESS_DEFAULTS, "robustness/demo.yaml", "model.preprocessing=torchvision")):
        cfg = load_config(defaults, demo, [override, f"train.output_dir={out}"])
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            main(cfg)
        assert not out.exists()


@pytest.mark.parametrize("tool, argv, key", [
    (make_imagenet_c, ["--val", MISSING, "--out", "out/c"], "--val"),
    (make_shards, [MISSING, "out/shards"], MISSING),
    (export_encoder, [f"{MISSING}.pth", "out/encoder.pth"], f"{MISSING}.pth"),
    (visualize, [f"{MISSING}.pth", f"{MISSING}.jpg", "--out", "out/recon.png"], f"{MISSING}.pth"),
], ids=["make_imagenet_c", "make_shards", "export_encoder", "visualize"])
def test_file_tools_check_before_they_write(tool, argv, key, workdir):
    refused(tool, argv, key, workdir)


@pytest.mark.parametrize("mode", MODES)
def test_train_det_checks_before_it_writes(mode, workdir, monkeypatch):
    pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")
    from rcmae.tools import train_det

    if mode == "torchrun":
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "1"}.items():
            monkeypatch.setenv(name, value)
    argv = ["--demo", *MODES[mode], f"train.init_checkpoint={MISSING}.pth", "train.output_dir=out/det"]
    refused(train_det, argv, "train.init_checkpoint", workdir)


@pytest.mark.parametrize("override, message", [
    ("optim.epochs=0", "optim.epochs must be 1 or more, got 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be 0 or more, got -1"),
    ("checkpoint.keep=-1", "checkpoint.keep must be 0 or more, got -1"),
    ("rcmae.momentum=1.5", "rcmae.momentum must be in (0, 1], got 1.5"),
    ("optim.clip_grad=[1]", "optim.clip_grad must be a number, got [1]"),
    ("optim.lr=-0.1", "optim.lr must be 0 or more, got -0.1"),
    ("train.stop_at_step=2.5", "train.stop_at_step must be an integer, got 2.5"),
])
def test_numbers_a_run_cannot_use_are_refused(override, message):
    from rcmae.core.config import load_config
    from rcmae.core.run import check_counts
    from rcmae.pretrain.defaults import DEFAULTS

    with pytest.raises(ConfigError) as error:
        check_counts(load_config(DEFAULTS, None, [override]))
    assert str(error.value) == message
