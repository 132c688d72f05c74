"""The Cascade Mask R-CNN configs (ViT-B / L / H) and the ViT-S Mask R-CNN config: their values
against upstream's, what they share with the configs they import, a forward pass of each model at a
tiny size, and our pre-run checks on each."""
from functools import partial

import pytest
import torch

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate  # noqa: E402
from detectron2.modeling.box_regression import Box2BoxTransform  # noqa: E402
from detectron2.modeling.matcher import Matcher  # noqa: E402
from detectron2.modeling.roi_heads import (  # noqa: E402
    CascadeROIHeads,
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    StandardROIHeads,
)
from fixtures import ROOT  # noqa: E402
from omegaconf import OmegaConf, SCMode  # noqa: E402

from rcmae.core import checkpoint as ck  # noqa: E402
from rcmae.core.errors import ConfigError  # noqa: E402
from rcmae.detection.checkpoint import load_vit_backbone  # noqa: E402
from rcmae.detection.data import build_coins_dataset  # noqa: E402
from rcmae.detection.preflight import check_run, load_config, unknown_arguments  # noqa: E402
from rcmae.pretrain.models import build_mae  # noqa: E402

CONFIGS = ROOT / "configs" / "detection"
NEW = ("cascade_mask_rcnn_vitdet_b_100ep", "cascade_mask_rcnn_vitdet_l_100ep", "cascade_mask_rcnn_vitdet_h_75ep",
       "mask_rcnn_vitdet_s_100ep")
CASCADES = NEW[:3]
STAGE_KEYS = tuple(f"model.roi_heads.{k}" for k in ("box_heads", "box_predictors", "proposal_matchers"))


def load_cfg(name):
    return LazyConfig.load(str(CONFIGS / f"{name}.py"))


def flat(node, key=""):
    """``{dotted key: leaf}`` of a config, interpolations resolved; a ``partial`` (the layer-decay
    function) opens into ``func`` and ``keywords.*``; lists of plain values and empty dicts are leaves."""
    if key == "":
        node = OmegaConf.to_container(node, resolve=True, structured_config_mode=SCMode.INSTANTIATE)  # ShapeSpec
    if isinstance(node, partial):
        items = [("func", node.func), ("args", list(node.args)), ("keywords", node.keywords)]
    elif isinstance(node, dict) and node:
        items = node.items()
    elif isinstance(node, list) and any(isinstance(v, (dict, list, partial)) for v in node):
        items = enumerate(node)
    else:
        return {key: node}
    out = {}
    for k, v in items:
        out.update(flat(v, f"{key}.{k}" if key else str(k)))
    return out


def windowed(depth, global_blocks):
    return [i for i in range(depth) if i not in global_blocks]


def cascade_stages(weights, ious):
    """The keys of the three stages as upstream's cascade config writes them (80 COCO classes)."""
    out = {}
    for i, (w, iou) in enumerate(zip(weights, ious)):
        head, pred, match = (f"{k}.{i}" for k in STAGE_KEYS)
        out |= {f"{head}._target_": FastRCNNConvFCHead, f"{head}.input_shape": ShapeSpec(channels=256, height=7, width=7),
                f"{head}.conv_dims": [256, 256, 256, 256], f"{head}.fc_dims": [1024], f"{head}.conv_norm": "LN",
                f"{pred}._target_": FastRCNNOutputLayers, f"{pred}.input_shape": ShapeSpec(channels=1024),
                f"{pred}.test_score_thresh": 0.05, f"{pred}.box2box_transform._target_": Box2BoxTransform,
                f"{pred}.box2box_transform.weights": list(w), f"{pred}.cls_agnostic_bbox_reg": True,
                f"{pred}.num_classes": 80,
                f"{match}._target_": Matcher, f"{match}.thresholds": [iou], f"{match}.labels": [0, 1],
                f"{match}.allow_low_quality_matches": False}
    return out


# detectron2 projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py at 02b5c4e2 (with the
# common/models/mask_rcnn_vitdet.py, common/optim.py and mask_rcnn_vitdet_b_100ep.py it imports)
CASCADE_B = {
    "model.roi_heads._target_": CascadeROIHeads,
    **cascade_stages(weights=[(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)], ious=[0.5, 0.6, 0.7]),
    "model.roi_heads.num_classes": 80,
    "model.roi_heads.batch_size_per_image": 512,
    "model.roi_heads.positive_fraction": 0.25,
    "model.roi_heads.mask_head.conv_dims": [256, 256, 256, 256, 256],
    "model.roi_heads.mask_head.conv_norm": "LN",
    "model.roi_heads.mask_head.num_classes": 80,
    "model.backbone.net.img_size": 1024,
    "model.backbone.net.embed_dim": 768,
    "model.backbone.net.depth": 12,
    "model.backbone.net.num_heads": 12,
    "model.backbone.net.drop_path_rate": 0.1,
    "model.backbone.net.window_size": 14,
    "model.backbone.net.window_block_indexes": [0, 1, 3, 4, 6, 7, 9, 10],
    "model.backbone.net.use_rel_pos": True,
    "optimizer.lr": 1e-4,
    "optimizer.weight_decay": 0.1,
    "optimizer.params.lr_factor_func.func": get_vit_lr_decay_rate,
    "optimizer.params.lr_factor_func.keywords.num_layers": 12,
    "optimizer.params.lr_factor_func.keywords.lr_decay_rate": 0.7,
    "optimizer.params.overrides.pos_embed.weight_decay": 0.0,
    "optimizer.params.weight_decay_norm": 0.0,
    "train.max_iter": 184375,
    "lr_multiplier.scheduler.milestones": [163889, 177546],
    "lr_multiplier.scheduler.num_updates": 184375,
    "lr_multiplier.warmup_length": 250 / 184375,
    "dataloader.train.total_batch_size": 64,
}
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_l_100ep.py at 02b5c4e2: cascade B, then these
CASCADE_L = CASCADE_B | {
    "model.backbone.net.embed_dim": 1024,
    "model.backbone.net.depth": 24,
    "model.backbone.net.num_heads": 16,
    "model.backbone.net.drop_path_rate": 0.4,
    "model.backbone.net.window_block_indexes": windowed(24, (5, 11, 17, 23)),
    "optimizer.params.lr_factor_func.keywords.num_layers": 24,
    "optimizer.params.lr_factor_func.keywords.lr_decay_rate": 0.8,
}
# projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_h_75ep.py at 02b5c4e2: cascade B, then these
CASCADE_H = {k: v for k, v in CASCADE_B.items() if not k.startswith("optimizer.params.overrides.")} | {
    "model.backbone.net.embed_dim": 1280,
    "model.backbone.net.depth": 32,
    "model.backbone.net.num_heads": 16,
    "model.backbone.net.drop_path_rate": 0.5,
    "model.backbone.net.window_block_indexes": windowed(32, (7, 15, 23, 31)),
    "optimizer.params.lr_factor_func.keywords.num_layers": 32,
    "optimizer.params.lr_factor_func.keywords.lr_decay_rate": 0.9,
    "optimizer.params.overrides": {},
    "optimizer.params.weight_decay_norm": None,
    "train.max_iter": 138281,
    "lr_multiplier.scheduler.milestones": [122916, 133159],
    "lr_multiplier.scheduler.num_updates": 138281,
    "lr_multiplier.warmup_length": 250 / 184375,  # upstream's H leaves B's fraction: ~187 warmup iterations
}
# ours, no upstream config: the Mask R-CNN B recipe (upstream's mask_rcnn_vitdet_b_100ep.py at
# 02b5c4e2, box head 4conv1fc LN, deltas (10, 10, 5, 5)) at the width and heads of ViT-S/16
VIT_S = {k: v for k, v in CASCADE_B.items() if not k.startswith(STAGE_KEYS)} | {
    "model.roi_heads._target_": StandardROIHeads,
    "model.roi_heads.box_head.conv_dims": [256, 256, 256, 256],
    "model.roi_heads.box_head.fc_dims": [1024],
    "model.roi_heads.box_head.conv_norm": "LN",
    "model.roi_heads.box_predictor.box2box_transform.weights": [10, 10, 5, 5],
    "model.roi_heads.box_predictor.test_score_thresh": 0.05,
    "model.roi_heads.proposal_matcher.thresholds": [0.5],
    "model.backbone.net.embed_dim": 384,
    "model.backbone.net.num_heads": 6,
}
EXPECTED = dict(zip(NEW, (CASCADE_B, CASCADE_L, CASCADE_H, VIT_S)))


@pytest.mark.parametrize("name", NEW)
def test_values_match_upstream(name):
    got, expected = flat(load_cfg(name)), EXPECTED[name]
    wrong = {k: (got.get(k, "<missing>"), v) for k, v in expected.items() if got.get(k, "<missing>") != v}
    assert wrong == {}, f"{name}: key: (config, upstream)"
    # the stages hold exactly upstream's keys, nothing more; Mask R-CNN's one-stage keys are gone
    for prefix in STAGE_KEYS:
        assert {k for k in got if k.startswith(prefix)} == {k for k in expected if k.startswith(prefix)}, prefix
    if name in CASCADES:
        assert not any(k.startswith(("model.roi_heads.box_head.", "model.roi_heads.box_predictor.",
                                     "model.roi_heads.proposal_matcher.")) for k in got)
    cfg = load_cfg(name)  # paper recipes: a backbone checkpoint is required, as the Mask R-CNN ones
    assert cfg.train.init_checkpoint == "" and cfg.train.allow_scratch is False and cfg.train.amp.enabled


@pytest.mark.parametrize("name, base, differ", [
    ("cascade_mask_rcnn_vitdet_b_100ep", "mask_rcnn_vitdet_b_100ep", ()),
    ("cascade_mask_rcnn_vitdet_l_100ep", "mask_rcnn_vitdet_l_100ep", ()),
    ("cascade_mask_rcnn_vitdet_h_75ep", "mask_rcnn_vitdet_h_75ep", ()),
    ("mask_rcnn_vitdet_s_100ep", "mask_rcnn_vitdet_b_100ep", ("model.backbone.net.embed_dim",
                                                              "model.backbone.net.num_heads")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_everything_else_is_the_imported_config(name, base, differ):
    """A cascade config is its Mask R-CNN config but for the box stages (mask head, sampler, data,
    optimizer, schedule unchanged); ViT-S is B but for the width and heads. Each writes its own output."""
    box = ("model.roi_heads._target_", "model.roi_heads.box_head", "model.roi_heads.box_predictor",
           "model.roi_heads.proposal_matcher")
    ours, theirs = flat(load_cfg(name)), flat(load_cfg(base))
    keep = lambda d: {k: v for k, v in d.items()  # noqa: E731
                      if not k.startswith(box) and k != "train.output_dir" and k not in differ}
    assert keep(ours) == keep(theirs)
    assert ours["train.output_dir"] != theirs["train.output_dir"]
    if name in CASCADES:  # the L and H stages are the B config's
        stages = lambda d: {k: v for k, v in d.items() if k.startswith(box)}  # noqa: E731
        assert stages(ours) == stages(flat(load_cfg("cascade_mask_rcnn_vitdet_b_100ep")))


def test_every_config_writes_its_own_output_dir():
    names = (*NEW, "mask_rcnn_vitdet_b_100ep", "mask_rcnn_vitdet_l_100ep", "mask_rcnn_vitdet_h_75ep", "demo_tiny")
    dirs = {name: load_cfg(name).train.output_dir for name in names}
    assert len(set(dirs.values())) == len(dirs), dirs


def tiny_image():
    torch.manual_seed(0)
    return [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]


@pytest.mark.parametrize("name", CASCADES)
def test_the_three_stages_run(name):
    cfg = load_cfg(name)
    net = cfg.model.backbone.net
    net.embed_dim, net.depth, net.num_heads, net.img_size, net.window_size = 64, 4, 2, 128, 4
    net.window_block_indexes = [0, 2]  # global attention in blocks 1 and 3
    cfg.model.backbone.square_pad = 128
    cfg.model.backbone.out_channels = cfg.model.proposal_generator.head.in_channels = 32
    cfg.model.proposal_generator.post_nms_topk = (50, 50)
    heads = cfg.model.roi_heads
    heads.num_classes = 2  # scores near 1/3, above the 0.05 threshold: there are detections
    for head, predictor in zip(heads.box_heads, heads.box_predictors):
        head.input_shape, head.conv_dims, head.fc_dims = ShapeSpec(channels=32, height=7, width=7), [32], [64]
        predictor.input_shape = ShapeSpec(channels=64)
    heads.mask_head.input_shape, heads.mask_head.conv_dims = ShapeSpec(channels=32, height=14, width=14), [32, 32]
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()

    roi = model.roi_heads
    assert isinstance(roi, CascadeROIHeads) and roi.num_cascade_stages == 3
    assert [tuple(p.box2box_transform.weights) for p in roi.box_predictor] == [(10, 10, 5, 5), (20, 20, 10, 10),
                                                                               (30, 30, 15, 15)]
    assert [m.thresholds[1:-1] for m in roi.proposal_matchers] == [[0.5], [0.6], [0.7]]
    assert all(p.bbox_pred.out_features == 4 for p in roi.box_predictor)  # class-agnostic: not 2 x 4
    assert all(p.cls_score.out_features == 3 for p in roi.box_predictor)  # num_classes followed roi_heads
    calls = []
    for i, stage in enumerate(roi.box_predictor):
        stage.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        out = model(tiny_image())
    assert calls == [0, 1, 2]
    inst = out[0]["instances"]
    assert len(inst) > 0 and inst.pred_boxes.tensor.shape == (len(inst), 4)
    assert torch.isfinite(inst.pred_boxes.tensor).all() and inst.pred_masks.shape == (len(inst), 128, 128)


def test_vit_s_backbone_builds_at_its_width_and_takes_our_vit_s_checkpoint(tmp_path):
    cfg = load_cfg("mask_rcnn_vitdet_s_100ep")
    net = cfg.model.backbone.net
    net.depth, net.window_block_indexes, net.img_size = 2, [0], 128  # block 1 global
    cfg.model.backbone.square_pad = 128
    cfg.model.proposal_generator.post_nms_topk = (50, 50)
    cfg.model.roi_heads.num_classes = 1
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    block = model.backbone.net.blocks[0]
    assert block.attn.num_heads == 6 and tuple(block.attn.qkv.weight.shape) == (3 * 384, 384)
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 128, 128))
        inst = model(tiny_image())[0]["instances"]
    assert {k: tuple(v.shape) for k, v in features.items()} == {f"p{i}": (1, 256, 128 >> i, 128 >> i)
                                                                 for i in range(2, 7)}
    assert len(inst) > 0 and inst.pred_boxes.tensor.shape == (len(inst), 4)

    # the full-depth backbone of the config takes every block of our ViT-S/16 pretraining
    torch.manual_seed(0)
    student = build_mae("vit_small_patch16", 224, 32, 1, 2)
    path = tmp_path / "rcmae_vit_small.pth"
    torch.save({"format": ck.FORMAT, "student": student.state_dict(), "teacher": student.state_dict()}, path)
    holder = torch.nn.Module()
    holder.backbone = instantiate(load_cfg("mask_rcnn_vitdet_s_100ep").model.backbone)
    report = load_vit_backbone(holder, str(path))
    assert {k.split(".")[3] for k in report.loaded if k.startswith("backbone.net.blocks.")} == set(map(str, range(12)))
    assert torch.equal(holder.backbone.net.blocks[11].mlp.fc2.weight, student.state_dict()["blocks.11.mlp.fc2.weight"])


@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    return build_coins_dataset(tmp_path_factory.mktemp("coins"))


@pytest.mark.parametrize("name", NEW)
def test_pre_run_checks_accept_the_configs(name, coins, tmp_path):
    path = CONFIGS / f"{name}.py"
    cfg = load_config(str(path), ["dataloader.train.dataset.names=coins", "dataloader.test.dataset.names=coins",
                                  "train.allow_scratch=True", f"train.output_dir={tmp_path / 'out'}"])
    cfg.datasets = {"coins": dict(json_file=str(coins[0]), image_root=str(coins[1]))}
    check_run(cfg, eval_only=False, resume=False, world_size=8)  # raises ConfigError on any problem
    assert unknown_arguments(cfg) == []
    # the checks see into the stage lists; a Mask R-CNN key is gone from the cascades
    if name in CASCADES:
        cfg.model.roi_heads.box_predictors[2].test_score_tresh = 0.1
        assert unknown_arguments(cfg) == [
            "model.roi_heads.box_predictors[2].test_score_tresh: not an argument of FastRCNNOutputLayers"]
        with pytest.raises(ConfigError, match="the config has no key model.roi_heads.box_predictor.test_score_thresh"):
            load_config(str(path), ["model.roi_heads.box_predictor.test_score_thresh=0.1"])
        load_config(str(path), ["model.roi_heads.box_predictors.2.test_score_thresh=0.1"])


def test_the_quick_vitdet_schedule_is_a_quarter_of_the_100_epochs():
    """The benchmark's quick preset: max_iter / 4, the lr steps at upstream's fractions of it (163889 and
    177546 of 184375), the 250-iteration warmup; everything else the 100-epoch config's."""
    quick, full = load_cfg("mask_rcnn_vitdet_b_25ep"), load_cfg("mask_rcnn_vitdet_b_100ep")
    assert quick.train.max_iter == 46093 == quick.lr_multiplier.scheduler.num_updates
    assert list(quick.lr_multiplier.scheduler.milestones) == [40972, 44386]
    assert round(quick.lr_multiplier.warmup_length * quick.train.max_iter) == 250
    schedule = ("train.max_iter", "train.output_dir", "lr_multiplier.scheduler.milestones",
                "lr_multiplier.scheduler.num_updates", "lr_multiplier.warmup_length")
    keep = lambda d: {k: v for k, v in d.items() if k not in schedule}  # noqa: E731
    assert keep(flat(quick)) == keep(flat(full))
