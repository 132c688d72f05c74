"""The paper's COCO protocol (Li et al. 2021 benchmark, as MIMDet reproduces it): the multi-depth ViT
backbone, its configs against MIMDet's values, checkpoint loading, and the CPU demo end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling.backbone.vit import ViT, get_abs_pos  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from fixtures import ROOT  # noqa: E402
from test_detection import mini_checkpoint  # noqa: E402

from rcmae.core import checkpoint as ck  # noqa: E402
from rcmae.core.vit import sincos_pos_embed  # noqa: E402
from rcmae.detection.checkpoint import load_vit_backbone  # noqa: E402
from rcmae.detection.mimdet import PrePaddedRCNN, rescale_from_padded  # noqa: E402
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


def micro_backbone(img=128, width=64, sincos_pos_grid=False):
    net = ViT(img_size=img, patch_size=16, embed_dim=width, depth=4, num_heads=2, window_size=4,
              window_block_indexes=[0, 2], use_rel_pos=True, pretrain_img_size=img if sincos_pos_grid else 64,
              pretrain_use_cls_token=not sincos_pos_grid)
    return MultiDepthViT(net, out_blocks=[0, 1, 2, 3], sincos_pos_grid=sincos_pos_grid)


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
    # MIMDet reports 118.67M (118,674,184): a new trainable 64 x 64 grid (3,145,728) where we keep the
    # pretrained 14 x 14 one + cls row (151,296; resized at each forward as in ViTDet), and BEiT-style
    # bias tables, (31^2 + 127^2) x 12 heads = 205,080, where detectron2 has decomposed ones, 8 windowed
    # blocks x 2 x 31 x 64 + 4 global x 2 x 127 x 64 = 96,768
    assert sum(p.numel() for p in model.parameters()) == 115_571_440
    assert 115_571_440 + (3_145_728 - 151_296) + (205_080 - 96_768) == 118_674_184
    assert sum(p.numel() for n, p in model.named_parameters() if ".rel_pos_" in n) == 96_768
    mimdet = instantiate(load("benchmarking_mask_rcnn_vit_b_100ep_mimdet").model)  # MIMDet's grid, our tables
    assert sum(p.numel() for p in mimdet.parameters()) == 118_674_184 - (205_080 - 96_768) == 118_565_872


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


# ----------------------------------------------------------------------------- padding to the square
@pytest.mark.parametrize("name, side", [("benchmarking_mask_rcnn_vit_b_100ep", 1024), ("benchmarking_demo_tiny", 256)])
def test_test_images_reach_the_vit_as_the_training_square(name, side):
    """A 4:3 test image (resized by the test mapper to a long side of ``side``) is padded to the square the
    training crops have, so the ViT sees the grid it trains on, not a multiple of 32 (768 x 1024: 48 x 64)."""
    cfg = load(name)
    cfg.model.backbone.bottom_up.net.embed_dim = 96  # the padding does not depend on the width
    assert "square_pad" not in cfg.model.backbone.bottom_up  # one setting, where detectron2 reads it
    model = instantiate(cfg.model).eval()
    images = model.preprocess_image([{"image": torch.zeros(3, side * 3 // 4, side)}])
    assert tuple(images.tensor.shape) == (1, 3, side, side)
    assert images.image_sizes == [(side * 3 // 4, side)]  # detections stay in the image's own frame


# ----------------------------------------------------------------------------- MIMDet's variant
MIMDET_VARIANT = "benchmarking_mask_rcnn_vit_b_100ep_mimdet"


def mimdet_layout_grid(dim, side):
    """Closed form of MIMDet's grid (models/benchmarking.py, build_2d_sincos_position_embedding: its
    meshgrid(grid_w, grid_h) makes "w" run along the token rows): token (row r, column c) holds
    [sin r w, cos r w, sin c w, cos c w], w_i = 10000^(-i / (dim / 4))."""
    w = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    rw, cw = r.reshape(-1, 1) * w, c.reshape(-1, 1) * w
    return torch.cat([rw.sin(), rw.cos(), cw.sin(), cw.cos()], dim=1).float()[None]


@pytest.fixture(scope="module")
def mimdet_model():
    cfg = load(MIMDET_VARIANT)
    cfg.model.backbone.bottom_up.net.embed_dim = 96  # 12 heads of 8; what is tested does not depend on the width
    model = instantiate(cfg.model).eval()
    cfg.optimizer.params.model = model
    return cfg, model, instantiate(cfg.optimizer)


def test_mimdet_variant_changes_only_what_mimdet_does_differently():
    from test_detection_configs import flat

    ours, base = flat(load(MIMDET_VARIANT)), flat(load("benchmarking_mask_rcnn_vit_b_100ep"))
    changed = {k for k in ours.keys() | base.keys() if ours.get(k, "<absent>") != base.get(k, "<absent>")}
    augmentations = ("dataloader.train.mapper.augmentations.", "dataloader.test.mapper.augmentations.")
    assert {k for k in changed if not k.startswith(augmentations)} == {
        "model._target_", "model.backbone.bottom_up.net.pretrain_img_size",
        "model.backbone.bottom_up.net.pretrain_use_cls_token", "model.backbone.bottom_up.sincos_pos_grid",
        "train.output_dir"}
    cfg = load(MIMDET_VARIANT)
    # MIMDet's order: resize, pad / crop to 1024 with 128, then flip; the test images padded alike
    train, test = cfg.dataloader.train.mapper.augmentations, cfg.dataloader.test.mapper.augmentations
    assert [a._target_ for a in train] == [T.ResizeScale, T.FixedSizeCrop, T.RandomFlip]
    assert [a._target_ for a in test] == [T.ResizeShortestEdge, T.FixedSizeCrop]
    for crop in (train[1], test[1]):
        assert (list(crop.crop_size), crop.pad, crop.pad_value) == ([1024, 1024], True, 128)


def test_mimdet_position_grid_is_a_trainable_64x64_sincos_grid_in_transposed_layout(mimdet_model):
    _, model, optimizer = mimdet_model
    grid = model.backbone.bottom_up.net.pos_embed
    assert tuple(grid.shape) == (1, 64 * 64, 96) and grid.requires_grad
    torch.testing.assert_close(grid.detach(), mimdet_layout_grid(96, 64))
    # MAE's layout (first half of the channels from the column, second from the row), transposed
    mae = sincos_pos_embed(96, 64, cls_token=False).reshape(64, 64, 96)
    torch.testing.assert_close(grid.detach().reshape(64, 64, 96), mae.transpose(0, 1))
    assert not torch.allclose(grid.detach().reshape(64, 64, 96), mae)
    group = next(g for g in optimizer.param_groups if any(p is grid for p in g["params"]))
    assert group["weight_decay"] == 0.0  # MIMDet: no decay on pos_embed
    # and it learns: a micro backbone with the same grid gets a gradient there
    backbone = micro_backbone(sincos_pos_grid=True)
    torch.testing.assert_close(backbone.net.pos_embed.detach(), mimdet_layout_grid(64, 8))
    sum(f.square().mean() for f in backbone(torch.randn(1, 3, 128, 128)).values()).backward()
    assert backbone.net.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pretrain_use_cls_token=False"):
        MultiDepthViT(ViT(img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2), [0, 1, 2, 3],
                      sincos_pos_grid=True)


def test_mimdet_grid_is_not_taken_from_the_checkpoint(tmp_path):
    path, teacher = mini_checkpoint(tmp_path)  # the demo's ViT-mini: width 128, depth 4, 8 x 8 grid + cls
    backbone = micro_backbone(width=128, sincos_pos_grid=True)
    report = load_vit_backbone(backbone, str(path))
    assert report.dropped == ["net.pos_embed"]
    torch.testing.assert_close(backbone.net.pos_embed.detach(), mimdet_layout_grid(128, 8))
    assert torch.equal(backbone.net.blocks[2].attn.qkv.weight, teacher["blocks.2.attn.qkv.weight"])


def test_mimdet_test_images_are_1024_squares_padded_with_128_before_normalisation(mimdet_model, tmp_path):
    cfg, model, _ = mimdet_model
    Image.fromarray(np.full((480, 640, 3), 30, np.uint8)).save(tmp_path / "photo.png")  # 4:3
    mapper = instantiate(cfg.dataloader.test.mapper)
    item = mapper({"file_name": str(tmp_path / "photo.png"), "height": 480, "width": 640, "image_id": 1})
    image = item["image"]
    assert tuple(image.shape) == (3, 1024, 1024)
    assert (image[:, :768] == 30).all() and (image[:, 768:] == 128).all()  # resized to 768 x 1024, then padded
    normalised = model.preprocess_image([item]).tensor[0]
    assert tuple(normalised.shape) == (3, 1024, 1024)
    mean, std = torch.tensor(cfg.model.pixel_mean), torch.tensor(cfg.model.pixel_std)
    torch.testing.assert_close(normalised[:, -1, -1], (128 - mean) / std)  # not 0 (the mean), as padding after
    # a training image is the same square (crop or pad), whatever the random scale
    item = instantiate(cfg.dataloader.train.mapper)({
        "file_name": str(tmp_path / "photo.png"), "height": 480, "width": 640, "image_id": 1,
        "annotations": [{"bbox": [100, 100, 200, 150], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                         "segmentation": [[100, 100, 300, 100, 300, 250, 100, 250]], "iscrowd": 0}]})
    assert tuple(item["image"].shape) == (3, 1024, 1024)


def padded_detections():
    """Two detections on a 480 x 640 image resized to 768 x 1024 and padded to 1024 x 1024; the second
    lies in the padding."""
    inst = Instances((1024, 1024))
    inst.pred_boxes = Boxes(torch.tensor([[100.0, 200.0, 300.0, 400.0], [900.0, 900.0, 1000.0, 1000.0]]))
    inst.scores = torch.tensor([0.9, 0.8])
    inst.pred_classes = torch.tensor([0, 0])
    inst.pred_masks = torch.ones(2, 1, 28, 28)
    return inst


def test_detections_on_padded_inputs_map_back_with_one_scale():
    out = rescale_from_padded(padded_detections(), 480, 640)
    # one factor, 640 / 1024 = 0.625, on both axes; detectron2's per-axis postprocess would take 480 / 1024
    # for y and put the box at y 93.75-187.5
    assert out.image_size == (480, 640) and len(out) == 1
    torch.testing.assert_close(out.pred_boxes.tensor, torch.tensor([[62.5, 125.0, 187.5, 250.0]]))
    rows, cols = out.pred_masks[0].nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (125, 249, 62, 187)  # pixel centres in the box
    assert detector_postprocess(padded_detections(), 480, 640).pred_boxes.tensor[0, 1] == pytest.approx(93.75)


def test_the_mimdet_model_rescales_its_detections_with_one_scale(monkeypatch):
    cfg = load("benchmarking_demo_tiny")
    cfg.model._target_ = PrePaddedRCNN
    model = instantiate(cfg.model).eval()
    monkeypatch.setattr(model.roi_heads, "forward", lambda *args, **kwargs: ([padded_detections()], {}))
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 1024, 1024), "height": 480, "width": 640}])[0]["instances"]
    torch.testing.assert_close(out.pred_boxes.tensor, torch.tensor([[62.5, 125.0, 187.5, 250.0]]))
