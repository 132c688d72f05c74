"""tools/measure_cost.py: FLOPs against the closed form, the architecture read from any checkpoint origin, the
command line's cost.json, and bad input refused before anything is written."""
import json
from functools import partial

import pytest
import torch
import torch.nn as nn
from fixtures import run_in_process
from timm.models.vision_transformer import VisionTransformer

from rcmae.benchmark.cost import count_flops
from rcmae.core import checkpoint as ck
from rcmae.core.vit import is_encoder_key
from rcmae.pretrain.models import build_mae
from rcmae.tools import measure_cost


def vit_macs(img: int, patch: int, width: int, depth: int) -> int:
    """A ViT's forward (mlp ratio 4, no head) as fvcore counts it: the patch embedding, per block the qkv,
    projection and MLP products (12 D^2 a token) and attention (Q K^T and weights x V: 2 N^2 D), and 5 a
    value for each of the 2 * depth + 1 layer norms."""
    n = (img // patch) ** 2 + 1
    return ((n - 1) * 3 * patch ** 2 * width + depth * (n * 12 * width ** 2 + 2 * n ** 2 * width)
            + (2 * depth + 1) * 5 * n * width)


@pytest.mark.parametrize("img_size", [32, 64])
def test_flops_equal_the_closed_form(img_size):
    """Exact, attention included (without the scaled_dot_product_attention handle the count misses 2 N^2 D a
    block), and the same whether timm fuses attention or computes it with matmuls."""
    vit = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                            global_pool="token", qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    flops, uncounted = count_flops(vit, img_size)
    assert flops == vit_macs(img_size, 8, 64, 2)
    assert set(uncounted) == {"aten::add", "aten::gelu"}
    for block in vit.blocks:
        block.attn.fused_attn = False
    assert count_flops(vit, img_size)[0] == flops


def micro_checkpoints(tmp_path) -> tuple[dict, dict]:
    """Our pretraining checkpoint of a micro RC-MAE (32 px), its encoder exported by tools/export_encoder.py and
    the same encoder as MAE releases it (``{"model": encoder}``); returns the paths and the encoder."""
    torch.manual_seed(0)
    sd = build_mae("vit_micro_patch8", 32, 32, 1, 2).state_dict()
    torch.save({"format": ck.FORMAT, "arch": "vit_micro_patch8", "student": sd, "teacher": sd}, tmp_path / "ours.pth")
    ck.export_encoder(tmp_path / "ours.pth", "teacher", tmp_path / "exported.pth")
    encoder = {k: v for k, v in sd.items() if is_encoder_key(k)}
    torch.save({"model": encoder}, tmp_path / "mae_encoder.pth")
    paths = {name: tmp_path / f"{name}.pth" for name in ("ours", "exported", "mae_encoder")}
    return paths, encoder


def test_command_line_reads_the_arch_from_any_checkpoint(tmp_path):
    paths, encoder = micro_checkpoints(tmp_path)
    assert set(torch.load(paths["exported"], weights_only=True)) == {"model", "meta"}
    for name, path in paths.items():
        out = tmp_path / f"cost_{name}"
        res = run_in_process(measure_cost, "--checkpoint", path, "--output", out, "--batch-size", 4, "--iters", 2)
        assert res.returncode == 0, res.stderr[-3000:]
        cost = json.loads((out / "cost.json").read_text())
        assert (cost["arch"], cost["img_size"], cost["checkpoint"]) == ("vit_micro_patch8", 32, str(path)), name
        assert cost["params"] == sum(v.numel() for v in encoder.values())
        assert cost["flops_per_image"] == vit_macs(32, 8, 32, 2) and "multiply-add" in cost["flops_counting"]
        assert cost["throughput_img_per_s"] > 0 and cost["peak_memory_gib"] > 0
        assert (cost["batch_size"], cost["iters"]) == (4, 2) and str(out / "cost.json") in res.stdout


def test_demo_measures_a_random_model(tmp_path):
    res = run_in_process(measure_cost, "--demo", "--output-dir", tmp_path, "cost.iters=1", "cost.warmup_iters=0")
    assert res.returncode == 0, res.stderr[-3000:]
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert (cost["arch"], cost["img_size"], cost["checkpoint"], cost["which"]) == ("vit_mini_patch8", 64, None, None)
    assert cost["flops_per_image"] == vit_macs(64, 8, 128, 4)


def bad_files(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing.pth"], "model.checkpoint: checkpoint {tmp}/missing.pth does not exist"),
    (["--checkpoint", "{tmp}/resnet.pth"], "model.checkpoint: {tmp}/resnet.pth: not a ViT state dict"),
    (["--checkpoint", "{tmp}/notes.pth"], "cannot read checkpoint {tmp}/notes.pth"),
    ([], "model.arch (--arch) is required without model.checkpoint (--checkpoint)"),
    (["--arch", "vit_micro_patch8", "--img-size", "36"], "model.img_size=36 is not a multiple of the patch size 8"),
    (["--arch", "vit_micro_patch8", "--iters", "0"], "cost.iters must be an integer of 1 or more, got 0"),
], ids=["missing", "not_a_vit", "not_a_checkpoint", "no_model", "img_size", "iters"])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    bad_files(tmp_path)
    out = tmp_path / "out"
    res = run_in_process(measure_cost, *[a.format(tmp=tmp_path) for a in args], "--output", out)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert message.format(tmp=tmp_path) in res.stderr
    assert not out.exists()


def test_arch_that_contradicts_the_checkpoint_and_dry_run(tmp_path):
    paths, _ = micro_checkpoints(tmp_path)
    out = tmp_path / "out"
    res = run_in_process(measure_cost, "--checkpoint", paths["ours"], "--arch", "vit_mini_patch8", "--output", out)
    assert res.returncode == 1 and "model.arch=vit_mini_patch8, but" in res.stderr and "vit_micro_patch8" in res.stderr
    res = run_in_process(measure_cost, "--checkpoint", paths["ours"], "--output", out, "--dry-run")
    assert res.returncode == 0 and "dry run: the checks passed" in res.stdout
    assert not out.exists()
