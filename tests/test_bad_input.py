"""Bad input gets a sentence, not a traceback: named file / key / expectation, before any work and
before anything is written (a failed start leaves no output directory behind)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, run_in_process
from PIL import Image
from test_readme_commands import TINY_DOWNSTREAM, TINY_PRETRAIN

from rcmae.core import checkpoint as ck
from rcmae.core.config import load_config
from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.readers import check_folder_pair
from rcmae.core.data.transforms import eval_transform
from rcmae.core.errors import ConfigError, DataError, OutputDirInUseError
from rcmae.core.vit import build_classifier
from rcmae.finetune import knn_tool
from rcmae.finetune import train as finetune_train
from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
from rcmae.finetune.defaults import KNN_TOOL_DEFAULTS
from rcmae.finetune.models import classifier_state
from rcmae.tools import export_encoder as export_tool
from rcmae.tools import finetune as finetune_tool
from rcmae.tools import knn as knn_tool_cli
from rcmae.tools import pretrain as pretrain_tool

SYNTHETIC = ["data.source=synthetic", "data.synthetic_size=16", *TINY_PRETRAIN]


def class_folders(root, classes, per_class=4, size=40, readable=True):
    """``root/<class>/<i>.jpg``: small solid-colour images (or bytes that are no image)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if readable:
                Image.new("RGB", (size, size), (60 * c + 20, 15 * i, 120)).save(root / name / f"{i}.jpg")
            else:
                (root / name / f"{i}.jpg").write_bytes(b"not a JPEG")
    return root


def cli_error(tool, *args) -> str:
    """The message a tool exits with (``sys.exit("error: ...")``); fails if it exits otherwise."""
    with pytest.raises(SystemExit) as e:
        tool.run([*map(str, args)])
    assert isinstance(e.value.code, str), f"exit code {e.value.code!r} instead of an error message"
    return e.value.code


# ----------------------------------------------------------------------------- class names (task 1)
CAT, CUP, ESPRESSO = "n02123045", "n07920052", "n03773504"


def pair(tmp_path, train_classes, val_classes, label_space="folder"):
    class_folders(tmp_path / "train", train_classes)
    class_folders(tmp_path / "val", val_classes)
    return {"source": "folder", "train_path": str(tmp_path / "train"), "val_path": str(tmp_path / "val"),
            "label_space": label_space}


def test_val_classes_must_be_the_train_classes_by_name(tmp_path):
    d = pair(tmp_path, [CAT, CUP], [CAT, ESPRESSO])  # the same number, other names
    with pytest.raises(ConfigError) as e:
        check_folder_pair(d, "data")
    message = str(e.value)
    assert d["val_path"] in message and d["train_path"] in message
    assert f"only in data.val_path: {ESPRESSO} (1 in all)" in message
    assert f"only in data.train_path: {CUP} (1 in all)" in message


def test_class_names_checked_for_finetuning_knn_and_the_pretraining_monitor(tmp_path):
    """The three consumers share the one check (3 val classes against 2 included); nothing is written."""
    class_folders(tmp_path / "train", [CAT, CUP])
    class_folders(tmp_path / "val", [CAT, CUP, ESPRESSO])
    folders = [f"data.train_path={tmp_path / 'train'}", f"data.val_path={tmp_path / 'val'}"]
    message = cli_error(finetune_tool, *TINY_DOWNSTREAM, *folders, f"train.output_dir={tmp_path / 'ft'}")
    assert f"only in data.val_path: {ESPRESSO} (1 in all)" in message
    message = cli_error(knn_tool_cli, "model.arch=vit_micro_patch8", "model.img_size=32", "data.num_workers=0",
                        "train.device=cpu", *folders, f"train.output_dir={tmp_path / 'knn'}")
    assert f"only in data.val_path: {ESPRESSO}" in message
    message = cli_error(pretrain_tool, *SYNTHETIC, "knn.every_epochs=1", f"knn.train_path={tmp_path / 'train'}",
                        f"knn.val_path={tmp_path / 'val'}", f"train.output_dir={tmp_path / 'pre'}")
    assert f"only in knn.val_path: {ESPRESSO}" in message
    assert not any((tmp_path / d).exists() for d in ("ft", "knn", "pre"))
    with pytest.raises(ConfigError, match="only in data.val_path"):  # the Python entry point as well
        knn_tool.main(load_config(KNN_TOOL_DEFAULTS, None, [*folders, f"train.output_dir={tmp_path / 'k2'}"]))


def test_imagenet_label_space_allows_a_val_subset_and_one_class_is_an_error(tmp_path):
    check_folder_pair(pair(tmp_path / "a", [CAT, CUP, ESPRESSO], [CAT, CUP], "imagenet1k"), "data")
    with pytest.raises(ConfigError, match=f"only in data.val_path: {ESPRESSO}"):  # never trained on
        check_folder_pair(pair(tmp_path / "b", [CAT, CUP], [CAT, CUP, ESPRESSO], "imagenet1k"), "data")
    with pytest.raises(ConfigError, match=r"data.train_path .* holds 1 class folder.*at least 2"):
        check_folder_pair(pair(tmp_path / "c", [CAT], [CAT]), "data")
    many = [f"n0{i}" for i in range(10)]
    with pytest.raises(ConfigError, match=r"only in data.val_path: n00, n01, n02, n03, n04 \.\.\. \(10 in all\)"):
        check_folder_pair(pair(tmp_path / "d", [CAT, CUP], [CAT, CUP, *many]), "data")


# ----------------------------------------------------------------------------- --dry-run (task 2)
def test_local_dry_run_checks_and_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_tool.run([*SYNTHETIC, f"train.output_dir={out}", "--dry-run"]) is None
    printed = capsys.readouterr().out
    assert "dry run" in printed and str(out) in printed and "1 process" in printed
    assert "model:\n  arch: vit_micro_patch8" in printed  # the resolved config
    assert not out.exists()  # nothing ran, nothing was written
    # the tool's own checks ran, for the world size the run would have
    message = cli_error(pretrain_tool, *SYNTHETIC, "train.micro_batch=3", f"train.output_dir={out}", "--dry-run")
    assert "optim.batch_size=8 must be a multiple of train.micro_batch (3)" in message and not out.exists()


@pytest.mark.slow
def test_local_dry_run_exit_status_from_the_command_line(tmp_path):
    run = [sys.executable, str(ROOT / "tools" / "finetune.py"), "--demo", f"train.output_dir={tmp_path / 'ft'}"]
    res = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "dry run" in res.stdout, res.stderr
    res = subprocess.run([*run, "--dry-run", "train.mode=finetuning"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode != 0 and "train.mode must be finetune or linprobe" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- output directory lock (task 3)
HOLD = """
import sys, time
from rcmae.core.config import load_config
from rcmae.core.run import start_run
from rcmae.finetune.defaults import KNN_TOOL_DEFAULTS
start_run(load_config(KNN_TOOL_DEFAULTS, None, ["train.device=cpu", "train.output_dir=" + sys.argv[1]]))
print("holding", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_second_run_on_one_output_directory_is_refused(tmp_path):
    """Two real processes (the holder, and this one starting ``python tools/pretrain.py``'s command line:
    fixtures.run_in_process): the second start names the holder (host, pid, command) and leaves the first
    run's files alone (its half-written checkpoint included); once the holder is dead its lock is
    taken over."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "--marker"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        writing = out / "checkpoint_00000004.pth.tmp"  # the holder's checkpoint being written
        writing.write_bytes(b"half")
        res = run_in_process(pretrain_tool, *SYNTHETIC, f"train.output_dir={out}")  # this process: the second
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert f"pid {holder.pid}" in res.stderr and "--marker" in res.stderr and os.uname().nodename in res.stderr
        assert writing.read_bytes() == b"half" and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    pretrain_tool.run([*SYNTHETIC, f"train.output_dir={out}", "optim.epochs=1"])  # the dead holder's lock taken over
    assert not writing.exists() and ck.find_last_checkpoint(out) is not None
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()


def test_lock_is_reentrant_within_a_process_and_refused_to_another(tmp_path):
    from rcmae.core.run import lock_output_dir, release_output_dirs

    try:
        lock_output_dir(tmp_path)
        lock_output_dir(tmp_path)  # the same process again (a main called twice): no conflict
        take = "import sys; from rcmae.core.run import lock_output_dir; lock_output_dir(sys.argv[1])"
        other = subprocess.run([sys.executable, "-c", take, str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and OutputDirInUseError.__name__ in other.stderr
        assert f"pid {os.getpid()}" in other.stderr
    finally:
        release_output_dirs()
    lock_output_dir(tmp_path)  # released: free again
    release_output_dirs()


# ----------------------------------------------------------------------------- tracebacks -> sentences (task 4)
def test_output_dir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    message = cli_error(pretrain_tool, *SYNTHETIC, f"train.output_dir={a_file}")
    assert f"train.output_dir={a_file} is a file" in message
    message = cli_error(pretrain_tool, *SYNTHETIC, f"train.output_dir={a_file / 'sub'}")
    assert f"{a_file} is a file" in message and not (a_file.parent / "sub").exists()

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: let access() answer as it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked)
                            else real_access(p, mode, **kw))
    try:
        message = cli_error(pretrain_tool, *SYNTHETIC, f"train.output_dir={locked / 'run'}")
        assert f"train.output_dir={locked / 'run'}" in message and f"{locked} is not writable" in message
        assert not (locked / "run").exists()
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("override,message", [
    ("optim.batch_size=0", "optim.batch_size must be a positive integer, got 0"),
    ("train.micro_batch=0", "train.micro_batch must be a positive integer, got 0"),
    ("data.num_workers=-1", "data.num_workers must be 0 or more, got -1"),
])
def test_counts_out_of_range_are_named(tmp_path, override, message):
    out = tmp_path / "run"
    assert message in cli_error(pretrain_tool, *SYNTHETIC, override, f"train.output_dir={out}")
    assert not out.exists()
    assert message in cli_error(pretrain_tool, *SYNTHETIC, override, f"train.output_dir={out}", "--dry-run")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_status_130_and_names_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "pretrain.py"), *SYNTHETIC, "optim.epochs=10000",
                             "checkpoint.every_steps=1", f"train.output_dir={out}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a shell
    try:
        deadline = time.time() + 240
        while not (out / "last_checkpoint").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    last = ck.find_last_checkpoint(out)
    assert str(last) in stderr and not list(out.glob("*.tmp"))


def test_keyboard_interrupt_in_any_tool_exits_130_naming_the_last_checkpoint(tmp_path, capsys):
    """run_cli answers Ctrl-C for every tool (the real signal: the slow test above)."""
    from rcmae.core.launcher import run_cli

    def run(out, main):
        with pytest.raises(SystemExit) as e:
            run_cli([f"train.output_dir={out}"], defaults=KNN_TOOL_DEFAULTS, main=main, demo_config="knn/demo.yaml",
                    name="test", description="")
        return e.value.code, capsys.readouterr().err

    def after_a_checkpoint(cfg):
        Path(cfg["train"]["output_dir"]).mkdir()
        ck.save_checkpoint({"step": 3}, cfg["train"]["output_dir"], 3, keep=1)
        raise KeyboardInterrupt

    def at_once(cfg):
        raise KeyboardInterrupt

    code, err = run(tmp_path / "run", after_a_checkpoint)
    assert code == 130 and f"The last checkpoint is {tmp_path / 'run' / 'checkpoint_00000003.pth'}" in err
    code, err = run(tmp_path / "early", at_once)
    assert code == 130 and f"No checkpoint was written in {tmp_path / 'early'}" in err


def test_folder_of_only_unreadable_images_fails_before_training_with_the_count(tmp_path):
    bad = class_folders(tmp_path / "bad", ["a", "b"], readable=False)
    out = tmp_path / "run"
    message = cli_error(pretrain_tool, *TINY_PRETRAIN, f"data.path={bad}", f"train.output_dir={out}")
    assert "all 8 images" in message and "unreadable" in message and str(bad) in message
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint_*"))


def test_unreadable_run_message_tells_the_true_count(tmp_path):
    good = class_folders(tmp_path / "img", ["a"], per_class=1)
    paths = [str(good / "a" / "0.jpg")] + [str(tmp_path / f"missing{i}.jpg") for i in range(3)]
    images = SeededImages(paths, eval_transform(32, None))
    many = SeededImages(paths[:1] + [str(tmp_path / f"m{i}.jpg") for i in range(60)], eval_transform(32, None))
    (good / "a" / "0.jpg").write_bytes(b"gone bad since")  # after the start-up check
    with pytest.raises(DataError, match="4 unreadable images in a row .*all 4 of the dataset"):
        images[(1, 0)]
    with pytest.raises(DataError, match="50 unreadable images in a row .*of 61"):
        many[(1, 0)]


def classifier_file(tmp_path, global_pool):
    model = build_classifier("vit_micro_patch8", 32, 2, global_pool)
    path = tmp_path / f"classifier_{global_pool}.pth"
    torch.save({"format": ck.CLASSIFIER_FORMAT, "arch": "vit_micro_patch8", "img_size": 32, "global_pool": global_pool,
                "num_classes": 2, "mode": "finetune", "model": classifier_state(model)}, path)
    return path


def test_export_writes_nothing_unless_everything_can_be_written(tmp_path):
    token = classifier_file(tmp_path, "token")
    out = tmp_path / "out"
    message = cli_error(export_tool, token, out / "encoder")  # no .pth: the folder would take the same name
    assert "encoder" in message and ".pth" in message and not out.exists()
    (out / "enc").mkdir(parents=True)
    (out / "enc" / "keep.txt").write_text("x")
    (out / "enc2").write_text("a file where the timm folder goes")
    message = cli_error(export_tool, token, out / "enc2.pth")
    assert f"{out / 'enc2'} is a file" in message and not (out / "enc2.pth").exists()

    avg = classifier_file(tmp_path, "avg")  # fine-tuned with average pooling: no final norm to export
    message = cli_error(export_tool, avg, out / "avg.pth", "--which", "auto")
    assert "norm.weight" in message and "global_pool=avg" in message
    assert not (out / "avg.pth").exists() and not (out / "avg").exists()
    export_tool.run([str(token), str(out / "tok.pth"), "--which", "auto"])  # a token-pool classifier's encoder
    assert (out / "tok.pth").is_file() and (out / "tok" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- fine-tuning checks order
def test_finetune_main_checks_before_it_creates_the_output_dir(tmp_path):
    class_folders(tmp_path / "train", [CAT, CUP])
    class_folders(tmp_path / "val", [CAT, ESPRESSO])
    cfg = load_config(FT_DEFAULTS, None, [*TINY_DOWNSTREAM, f"data.train_path={tmp_path / 'train'}",
                                          f"data.val_path={tmp_path / 'val'}", f"train.output_dir={tmp_path / 'ft'}"])
    with pytest.raises(ConfigError, match="only in data.val_path"):
        finetune_train.main(cfg)
    assert not (tmp_path / "ft").exists()


def test_disk_full_is_reported_through_the_tool(tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written: the tool exits with the file and the space, no traceback."""
    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    message = cli_error(pretrain_tool, *SYNTHETIC, f"train.output_dir={out}")
    assert "no space left" in message.lower() and "checkpoint_00000002.pth" in message and "free" in message
    assert not list(out.glob("*.tmp"))
