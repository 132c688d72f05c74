"""The paper's COCO protocol (Li et al. 2021 benchmark, as MIMDet reproduces it): the multi-depth ViT
backbone, its configs against MIMDet's values, checkpoint loading, and the CPU demo end to end."""
import json

import pytest
import torch

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from conftest import ROOT  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling.backbone.vit import ViT, get_abs_pos  # noqa: E402
from test_detection import mini_checkpoint  # noqa: E402

from rcmae.core import checkpoint as ck  # noqa: E402
from rcmae.detection.checkpoint import load_vit_backbone  # noqa: E402
from rcmae.detection.multidepth_vit import MultiDepthViT  # noqa: E402

CONFIGS = ROOT / "configs" / "detection"

# hustvl/MIMDet configs/benchmarking/benchmarking_mask_rcnn_base_FPN_{100,50,25}ep_LSJ_mae.py at fb0aaa1d
MIMDET = {"net.img_size": 1024, "net.patch_size": 16, "net.embed_dim": 768, "net.depth": 12, "net.num_heads": 12,
          "net.drop_path_rate": 0.1, "net.window_size": 16, "net.window_block_indexes": [0, 1, 3, 4, 6, 7, 9, 10],
          "out_blocks": [2, 5, 8, 11], "fpn.out_channels": 256, "fpn.norm": "SyncBN", "rpn.conv_dims": [-1, -1],
          "box.conv_dims": [256] * 4, "box.fc_dims": [1024], "box.conv_norm": "naiveSyncBN_N",
          "mask.conv_norm": "naiveSyncBN_N", "mask.conv_dims": [256] * 5, "lr": 8e-5, "weight_decay": 0.1,
          "betas": [0.9, 0.999], "weight_decay_norm": 0.0, "batch": 64, "warmup_factor": 0.001,
          "no_decay": {"pos_embed", "rel_pos_h", "rel_pos_w"}, "pixel_mean": [123.675, 116.28, 103.53],
          "pixel_std": [58.395, 57.12, 57.375]}
SCHEDULES = {100: (184375, 0.25 / 100), 50: (92187, 0.5 / 100), 25: (46093, 1.0 / 100)}


def load(name):
    return LazyConfig.load(str(CONFIGS / f"{name}.py"))


def values(cfg) -> dict:
    m, bb = cfg.model, cfg.model.backbone
    net = bb.bottom_up.net
    return {**{f"net.{k}": net[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                             "drop_path_rate", "window_size", "window_block_indexes")},
            "out_blocks": bb.bottom_up.out_blocks, "fpn.out_channels": bb.out_channels, "fpn.norm": bb.norm,
            "rpn.conv_dims": m.proposal_generator.head.conv_dims, "box.conv_dims": m.roi_heads.box_head.conv_dims,
            "box.fc_dims": m.roi_heads.box_head.fc_dims, "box.conv_norm": m.roi_heads.box_head.conv_norm,
            "mask.conv_norm": m.roi_heads.mask_head.conv_norm, "mask.conv_dims": m.roi_heads.mask_head.conv_dims,
            "lr": cfg.optimizer.lr, "weight_decay": cfg.optimizer.weight_decay, "betas": list(cfg.optimizer.betas),
            "weight_decay_norm": cfg.optimizer.params.weight_decay_norm,
            "batch": cfg.dataloader.train.total_batch_size, "warmup_factor": cfg.lr_multiplier.warmup_factor,
            "no_decay": {k for k, v in cfg.optimizer.params.overrides.items() if v == {"weight_decay": 0.0}},
            "pixel_mean": list(m.pixel_mean), "pixel_std": list(m.pixel_std)}


@pytest.mark.parametrize("epochs", [100, 50, 25])
def test_configs_match_mimdet(epochs):
    cfg = load(f"benchmarking_mask_rcnn_vit_b_{epochs}ep")
    assert values(cfg) == MIMDET
    max_iter, warmup = SCHEDULES[epochs]
    assert cfg.train.max_iter == max_iter and cfg.lr_multiplier.warmup_length == pytest.approx(warmup)
    assert round(max_iter * warmup) == 461  # the same warmup in iterations for every length
    sched = instantiate(cfg.lr_multiplier.scheduler)
    assert sched(0.0) == 1.0 and sched(1.0) == pytest.approx(0.0) and sched(0.5) == pytest.approx(0.5)  # cosine


def micro_backbone(img=128):
    net = ViT(img_size=img, patch_size=16, embed_dim=64, depth=4, num_heads=2, window_size=4,
              window_block_indexes=[0, 2], use_rel_pos=True, pretrain_img_size=64)
    return MultiDepthViT(net, out_blocks=[0, 1, 2, 3], square_pad=img)


def test_features_from_four_depths_at_strides_4_to_32():
    torch.manual_seed(0)
    backbone = micro_backbone().eval()
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {"s0": (64, 4), "s1": (64, 8), "s2": (64, 16),
                                                                       "s3": (64, 32)}
    x = torch.randn(2, 3, 128, 128)
    out = backbone(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"s0": (2, 64, 32, 32), "s1": (2, 64, 16, 16),
                                                           "s2": (2, 64, 8, 8), "s3": (2, 64, 4, 4)}
    # recomputed by hand: s2 is block 2's token map as it is, s3 block 3's max-pooled
    tokens = backbone.net.patch_embed(x)
    tokens = tokens + get_abs_pos(backbone.net.pos_embed, True, (8, 8))
    maps = []
    for block in backbone.net.blocks:
        tokens = block(tokens)
        maps.append(tokens.permute(0, 3, 1, 2))
    torch.testing.assert_close(out["s2"], maps[2])
    torch.testing.assert_close(out["s3"], torch.nn.functional.max_pool2d(maps[3], 2))
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 128}
    with pytest.raises(ValueError, match="4 increasing block indices"):
        MultiDepthViT(backbone.net, out_blocks=[0, 1, 2, 4])


def test_demo_model_loads_our_mae_and_rcmae_checkpoints(tmp_path):
    cfg = load("benchmarking_demo_tiny")
    model = instantiate(cfg.model)
    path, teacher = mini_checkpoint(tmp_path)
    report = load_vit_backbone(model, str(path))  # teacher by default
    prefix = "backbone.bottom_up.net."
    assert {k.split(".")[4] for k in report.loaded if k.startswith(prefix + "blocks.")} == set("0123")
    assert torch.equal(model.backbone.bottom_up.net.blocks[3].mlp.fc2.weight, teacher["blocks.3.mlp.fc2.weight"])
    assert all(k.startswith(prefix) for k in report.loaded)
    assert not any(k.startswith(prefix) and ".rel_pos_" not in k for k in report.missing)  # the ViT is all there
    ours = ck.read_checkpoint(path)
    torch.save({"model": {k: v for k, v in ours.student.items() if not k.startswith("decoder")}}, tmp_path / "mae.pth")
    torch.save({"student": {f"module.{k}": v for k, v in ours.student.items()}, "teacher": teacher},
               tmp_path / "rcmae.pth")
    load_vit_backbone(model, str(tmp_path / "mae.pth"))
    assert torch.equal(model.backbone.bottom_up.net.blocks[1].attn.qkv.weight, ours.student["blocks.1.attn.qkv.weight"])
    load_vit_backbone(model, str(tmp_path / "rcmae.pth"))
    assert torch.equal(model.backbone.bottom_up.net.blocks[1].attn.qkv.weight, teacher["blocks.1.attn.qkv.weight"])
    micro, _ = mini_checkpoint(tmp_path, "vit_micro_patch8", 32)  # another width and depth
    with pytest.raises(ck.CheckpointError, match="does not fit.*backbone.bottom_up.net.blocks"):
        load_vit_backbone(model, str(micro))


@pytest.mark.slow
def test_b_config_instantiates_and_takes_a_vit_b_checkpoint(tmp_path):
    import timm

    cfg = load("benchmarking_mask_rcnn_vit_b_100ep")
    model = instantiate(cfg.model)
    encoder = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_base.pth")  # MAE's encoder file layout
    report = load_vit_backbone(model, str(tmp_path / "mae_pretrain_vit_base.pth"))
    net = model.backbone.bottom_up.net
    assert len(report.loaded) == len([k for k in encoder if not k.startswith(("cls_token", "norm."))])
    assert torch.equal(net.blocks[11].attn.proj.weight, encoder["blocks.11.attn.proj.weight"])
    assert [b.window_size for b in net.blocks] == [16, 16, 0, 16, 16, 0, 16, 16, 0, 16, 16, 0]
    # MIMDet reports 118.67M: its position embedding is a trainable 64 x 64 grid (3.15M); ours is the
    # pretrained 14 x 14 one (0.15M), resized at each forward as in ViTDet
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(118.67 - 3.146 + 0.151, abs=0.2)


@pytest.mark.slow
def test_demo_trains_and_evaluates(tmp_path):
    from rcmae.tools import train_det

    path, _ = mini_checkpoint(tmp_path)
    out = tmp_path / "bench"
    result = train_det.run(["--config-file", str(CONFIGS / "benchmarking_demo_tiny.py"), f"train.output_dir={out}",
                            "train.max_iter=20", "train.eval_period=20", f"train.init_checkpoint={path}"])
    logs = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if "total_loss" in x]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in logs)
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert 0 <= evaluated["bbox"]["AP"] <= 100 and 0 <= evaluated["segm"]["AP"] <= 100
    assert result["box_AP"] == pytest.approx(evaluated["bbox"]["AP"])
    DatasetCatalog.remove("coins_demo")
    MetadataCatalog.remove("coins_demo")
