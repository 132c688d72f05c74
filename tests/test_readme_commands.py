"""Properties of the README's commands beyond running as written (tests/test_docs_commands.py runs each):
every checkpoint origin gives the same fine-tuned classifier and the same exported encoder, k-NN on 2
processes equals 1; on a miniature ImageNet laid out like the real one (train/ and val/ of wnid folders)."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from fixtures import ROOT, run_in_process

from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
from rcmae.tools import export_encoder as export_tool
from rcmae.tools import finetune as finetune_tool
from rcmae.tools import pretrain as pretrain_tool

# model and schedule shrunk; everything else is the recipe the command names
TINY_PRETRAIN = ["model.arch=vit_micro_patch8", "model.img_size=32", "model.decoder_dim=32", "model.decoder_depth=1",
                 "model.decoder_heads=2", "optim.batch_size=8", "optim.epochs=2", "optim.warmup_epochs=1",
                 "train.micro_batch=4", "data.num_workers=0", "log.recon_every_epochs=0", "train.device=cpu"]
TINY_DOWNSTREAM = ["model.arch=vit_micro_patch8", "model.img_size=32", "optim.batch_size=8", "optim.epochs=1",
                   "optim.warmup_epochs=0", "train.micro_batch=4", "data.num_workers=0", "train.device=cpu",
                   "eval.batch_size=8"]


def run(*args, torchrun=False, timeout=600):
    """The command in a process of its own, as a user runs it (torchrun, and the one process it is compared with)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(29500 + os.getpid() % 1000)] if torchrun else [sys.executable]
    res = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def run_here(tool, *args):
    """:func:`run` of ``tools/<tool>.py`` in this process (fixtures.run_in_process): for what needs no
    process of its own."""
    res = run_in_process(tool, *args)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, imagenet):
    """A pretraining run of the default recipe (RC-MAE ViT-B/16, shrunk) on the miniature."""
    out = tmp_path_factory.mktemp("pretrain")
    run_here(pretrain_tool, f"data.path={imagenet / 'train'}", f"train.output_dir={out}", *TINY_PRETRAIN)
    return out


def official_files(pretrained, tmp_path):
    """The same weights as an official MAE file ({"model"}), an official RC-MAE file (module. prefixes)
    and a timm state dict (the exported encoder), next to ours."""
    ckpt = read_checkpoint(find_last_checkpoint(pretrained))
    torch.save({"model": ckpt.teacher, "epoch": 1}, tmp_path / "mae_pretrain_vit.pth")
    torch.save({"student": {f"module.{k}": v for k, v in ckpt.student.items()},
                "teacher": ckpt.teacher, "epoch": 1}, tmp_path / "rcmae_official.pth")
    encoder = torch.load(pretrained / "encoder_teacher.pth", weights_only=True)["model"]
    torch.save(encoder, tmp_path / "timm_vit.pth")
    return {"ours": find_last_checkpoint(pretrained), "mae": tmp_path / "mae_pretrain_vit.pth",
            "rcmae": tmp_path / "rcmae_official.pth", "timm": tmp_path / "timm_vit.pth"}


@pytest.mark.slow
def test_finetune_from_every_checkpoint_origin(tmp_path, pretrained, imagenet):
    """``python tools/finetune.py --config-file configs/finetune/rcmae_vit_base.yaml init.checkpoint=...
    data.train_path=... data.val_path=...`` from ours, MAE's, RC-MAE's and timm's files: the same teacher
    weights give the same fine-tuned classifier."""
    heads = {}
    for origin, path in official_files(pretrained, tmp_path).items():
        out = tmp_path / f"ft_{origin}"
        run_here(finetune_tool, "--config-file", "configs/finetune/rcmae_vit_base.yaml", f"init.checkpoint={path}",
                 f"data.train_path={imagenet / 'train'}", f"data.val_path={imagenet / 'val'}",
                 f"train.output_dir={out}", *TINY_DOWNSTREAM,
                 *(["init.which=auto"] if origin in ("mae", "timm") else []))
        best = torch.load(out / "classifier_best.pth", weights_only=True)
        assert best["eval"]["n"] == 16 and best["num_classes"] == 4
        heads[origin] = best["model"]["head.weight"]
    for origin, head in heads.items():
        torch.testing.assert_close(head, heads["ours"], msg=origin)


@pytest.mark.slow
def test_knn_under_torchrun_equals_one_process(tmp_path, pretrained, imagenet):
    """``torchrun ... tools/knn.py init.checkpoint=... data.train_path=... data.val_path=...`` with 2 processes
    gives the one-process result."""
    ckpt = find_last_checkpoint(pretrained)
    data = [f"data.train_path={imagenet / 'train'}", f"data.val_path={imagenet / 'val'}"]
    knn = ["model.arch=vit_micro_patch8", "model.img_size=32", "data.num_workers=0", "train.device=cpu"]
    run("tools/knn.py", f"init.checkpoint={ckpt}", *data, f"train.output_dir={tmp_path / 'knn2'}", *knn, torchrun=True)
    run("tools/knn.py", f"init.checkpoint={ckpt}", *data, f"train.output_dir={tmp_path / 'knn1'}", *knn)
    two, one = (json.loads((tmp_path / d / "knn.json").read_text()) for d in ("knn2", "knn1"))
    assert two["knn_n"] == one["knn_n"] == 16 and two["knn_top1"] == one["knn_top1"]


def test_export_commands(tmp_path, pretrained):
    """``python tools/export_encoder.py CKPT encoder.pth`` and, for an official MAE file, ``--which student``."""
    files = official_files(pretrained, tmp_path)
    run_here(export_tool, files["ours"], tmp_path / "encoder.pth")
    run_here(export_tool, files["mae"], tmp_path / "mae_encoder.pth", "--which", "student")
    ours, mae = (timm.create_model(f"local-dir:{tmp_path / n}", pretrained=True) for n in ("encoder", "mae_encoder"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), mae.forward_features(x))  # the teacher, both ways
