import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from fixtures import ROOT  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from timm.layers import resample_patch_embed  # noqa: E402

from rcmae.core import checkpoint as ck  # noqa: E402
from rcmae.detection.checkpoint import convert_to_detectron2, load_vit_backbone  # noqa: E402
from rcmae.detection.data import DatasetError, build_coins_dataset, register_coco, validate_coco_json  # noqa: E402
from rcmae.detection.evaluation import COCOEval  # noqa: E402
from rcmae.pretrain.models import build_mae  # noqa: E402

CONFIGS = ROOT / "configs" / "detection"


def load_cfg(name):
    return LazyConfig.load(str(CONFIGS / f"{name}.py"))


def mini_checkpoint(tmp_path, arch="vit_mini_patch8", img_size=64):
    torch.manual_seed(0)
    student = build_mae(arch, img_size, 32, 1, 2)
    teacher = {k: v * 2 for k, v in student.state_dict().items()}
    path = tmp_path / f"{arch}.pth"
    torch.save({"format": ck.FORMAT, "student": student.state_dict(), "teacher": teacher}, path)
    return path, teacher


def test_every_vit_key_lands_in_the_backbone(tmp_path):
    path, teacher = mini_checkpoint(tmp_path)
    model = instantiate(load_cfg("demo_tiny").model)
    report = load_vit_backbone(model, str(path))  # teacher by default
    assert {k.split(".")[3] for k in report.loaded if k.startswith("backbone.net.blocks.")} == set("0123")
    sd = model.state_dict()
    for k, v in teacher.items():
        target = "backbone.net." + k
        if k.startswith("blocks.") or k == "pos_embed":
            assert torch.equal(sd[target], v), k
        elif k == "patch_embed.proj.weight":  # patch 8 -> 16, as ViT-H's 14 -> 16
            assert torch.equal(sd[target], resample_patch_embed(v, [16, 16]))
        elif k == "patch_embed.proj.bias":
            assert torch.equal(sd[target], v)
        else:  # cls token, final norm, decoder, mask token: not part of ViTDet
            assert target not in sd, k
    converted = convert_to_detectron2(str(path), "student")
    assert all(k.startswith("backbone.net.") for k in converted)
    assert not any(("cls_token" in k) or ("decoder" in k) or k.startswith("backbone.net.norm.") for k in converted)


def test_official_formats_and_wrong_checkpoints(tmp_path):
    path, teacher = mini_checkpoint(tmp_path)
    ours = ck.read_checkpoint(path)
    torch.save({"student": {f"module.{k}": v for k, v in ours.student.items()}, "teacher": teacher},
               tmp_path / "rcmae.pth")
    torch.save({"model": {k: v for k, v in ours.student.items() if not k.startswith("decoder")}},
               tmp_path / "mae_encoder.pth")
    model = instantiate(load_cfg("demo_tiny").model)
    load_vit_backbone(model, str(tmp_path / "rcmae.pth"))
    assert torch.equal(model.backbone.net.blocks[2].mlp.fc1.weight, teacher["blocks.2.mlp.fc1.weight"])
    load_vit_backbone(model, str(tmp_path / "mae_encoder.pth"))
    assert torch.equal(model.backbone.net.blocks[2].mlp.fc1.weight, ours.student["blocks.2.mlp.fc1.weight"])

    micro, _ = mini_checkpoint(tmp_path, "vit_micro_patch8", 32)  # another width and depth
    with pytest.raises(ck.CheckpointError, match="as the ViTDet backbone does not fit.*missing keys.*blocks.2"):
        load_vit_backbone(model, str(micro))
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "nohead.pth")
    with pytest.raises(ck.CheckpointError, match="holds no ViT blocks"):
        load_vit_backbone(model, str(tmp_path / "nohead.pth"))


def test_layer_decay_factors_for_vit_base():
    cfg = load_cfg("mask_rcnn_vitdet_b_100ep")
    model = instantiate(cfg.model)
    params = copy.deepcopy(cfg.optimizer.params)
    params.model = model
    groups = instantiate(params)
    names = {id(p): n for n, p in model.named_parameters()}
    checked = 0
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            if name.startswith("backbone.net.") and (".pos_embed" in name or ".patch_embed" in name):
                layer = 0
            elif name.startswith("backbone.net.blocks."):
                layer = int(name.split(".")[3]) + 1
            else:  # pyramid, RPN and ROI heads
                layer = 13
            assert g["lr"] == pytest.approx(1e-4 * 0.7 ** (13 - layer)), name
            if name == "backbone.net.pos_embed":
                assert g["weight_decay"] == 0.0
            checked += 1
    assert checked == len(list(model.parameters()))


def test_shipped_configs():
    b = load_cfg("mask_rcnn_vitdet_b_100ep")
    net = b.model.backbone.net
    assert (net.embed_dim, net.depth, net.window_size, net.drop_path_rate, net.use_rel_pos) == (768, 12, 14, 0.1, True)
    assert sorted(set(range(12)) - set(net.window_block_indexes)) == [2, 5, 8, 11]
    assert b.model.backbone.scale_factors == (4.0, 2.0, 1.0, 0.5) and b.model.backbone.norm == "LN"
    assert list(b.model.roi_heads.box_head.conv_dims) == [256] * 4 and list(b.model.roi_heads.box_head.fc_dims) == [1024]
    assert b.model.roi_heads.mask_head.conv_norm == "LN"
    aug = b.dataloader.train.mapper.augmentations
    assert (aug[1].min_scale, aug[1].max_scale, aug[1].target_height, tuple(aug[2].crop_size)) == (0.1, 2.0, 1024, (1024, 1024))
    assert (b.optimizer.lr, b.optimizer.weight_decay, tuple(b.optimizer.betas)) == (1e-4, 0.1, (0.9, 0.999))
    assert b.dataloader.train.total_batch_size == 64 and b.train.max_iter == 184375 and b.train.amp.enabled
    s = b.lr_multiplier
    assert list(s.scheduler.milestones) == [163889, 177546]  # upstream ViTDet's (~88.9 % and ~96.3 % of 184,375)
    assert s.warmup_length * b.train.max_iter == pytest.approx(250)
    assert s.warmup_factor == 0.001 and list(s.scheduler["values"]) == [1.0, 0.1, 0.01]
    for name, dim, depth, glob, drop, decay in (("mask_rcnn_vitdet_l_100ep", 1024, 24, [5, 11, 17, 23], 0.4, 0.8),
                                                ("mask_rcnn_vitdet_h_75ep", 1280, 32, [7, 15, 23, 31], 0.5, 0.9)):
        cfg = load_cfg(name)
        net = cfg.model.backbone.net
        assert (net.embed_dim, net.depth, net.drop_path_rate) == (dim, depth, drop)
        assert sorted(set(range(depth)) - set(net.window_block_indexes)) == glob
        assert dict(cfg.optimizer.params.lr_factor_func.keywords) == {"num_layers": depth, "lr_decay_rate": decay}
        net.embed_dim = 64  # instantiate every block at a tiny width
        model = instantiate(cfg.model)
        assert len(model.backbone.net.blocks) == depth
    h = load_cfg("mask_rcnn_vitdet_h_75ep")
    assert h.train.max_iter == 138281 and h.lr_multiplier.scheduler.num_updates == 138281
    assert h.model.backbone.net.pretrain_img_size // 16 == 224 // 14  # the 16x16 grid of ViT-H/14
    tiny = instantiate(load_cfg("demo_tiny").model)
    assert sum(p.numel() for p in tiny.parameters()) < 3e6


@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    json_file, image_root = build_coins_dataset(tmp_path_factory.mktemp("coins"))
    register_coco("coins_eval_test", json_file, image_root)
    DatasetCatalog.get("coins_eval_test")  # loading sets the category-id mapping, as the test loader does
    return json.loads(Path(json_file).read_text())


def _evaluate(coins, shift=0.0, masks=True, empty=False):
    evaluator = COCOEval("coins_eval_test", distributed=False)
    evaluator.reset()
    anns = {}
    for a in coins["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for img in coins["images"]:
        h, w = img["height"], img["width"]
        inst = Instances((h, w))
        objs = [] if empty else anns[img["id"]]
        boxes = torch.tensor([BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in objs]
                             ).reshape(-1, 4)
        widths = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += shift * widths[:, None]
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(objs))
        inst.pred_classes = torch.zeros(len(objs), dtype=torch.long)
        if masks:
            rle = [mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)) for a in objs]
            inst.pred_masks = torch.from_numpy(mask_util.decode(rle)).permute(2, 0, 1).bool() if objs \
                else torch.zeros(0, h, w, dtype=torch.bool)
        evaluator.process([{"image_id": img["id"], "height": h, "width": w}], [{"instances": inst}])
    return evaluator.evaluate()


def test_evaluation_known_answers(coins):
    perfect = _evaluate(coins)
    assert perfect["bbox"]["AP"] == pytest.approx(100.0) and perfect["segm"]["AP"] == pytest.approx(100.0)
    shifted = _evaluate(coins, shift=0.2)  # IoU (1 - 0.2) / (1 + 0.2) = 2/3 for every box
    assert shifted["bbox"]["AP"] == pytest.approx(40.0) and shifted["bbox"]["AP50"] == pytest.approx(100.0)
    assert shifted["bbox"]["AP75"] == pytest.approx(0.0)
    nothing = _evaluate(coins, empty=True)
    assert nothing["bbox"]["AP"] == 0.0 and nothing["segm"]["AP"] == 0.0


def _write(tmp_path, coco, name="ann.json"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    f = tmp_path / name
    f.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return f


def test_dataset_registration_errors(tmp_path):
    good = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                             "segmentation": [[1, 1, 4, 1, 4, 4]], "iscrowd": 0, "area": 9}],
            "categories": [{"id": 1, "name": "thing"}]}
    validate_coco_json(_write(tmp_path, good), tmp_path / "images")
    with pytest.raises(DatasetError, match="missing.json does not exist"):
        register_coco("x1", tmp_path / "missing.json", tmp_path / "images")
    with pytest.raises(DatasetError, match=r"bad.json: not valid JSON"):
        validate_coco_json(_write(tmp_path, "{", "bad.json"), tmp_path / "images")
    with pytest.raises(DatasetError, match=r"missing top-level keys \['categories'\]"):
        validate_coco_json(_write(tmp_path, {k: good[k] for k in ("images", "annotations")}), tmp_path / "images")
    cases = [({"bbox": [1, 1, -3, 3]}, "annotation 7: bbox must be"),
             ({"category_id": 5}, "annotation 7: category_id 5 is not in categories"),
             ({"image_id": 2}, "annotation 7: image_id 2 is not in images"),
             ({"segmentation": [[1, 1, 4, 1, 4]]}, "annotation 7: polygons need an even number")]
    for change, message in cases:
        bad = copy.deepcopy(good)
        bad["annotations"][0].update(change)
        with pytest.raises(DatasetError, match=message):
            validate_coco_json(_write(tmp_path, bad), tmp_path / "images")
    with pytest.raises(DatasetError, match="image root .* does not exist"):
        validate_coco_json(_write(tmp_path, good), tmp_path / "nowhere")
    bad = copy.deepcopy(good)
    bad["images"][0]["file_name"] = "b.png"
    with pytest.raises(DatasetError, match=r"1 of its 1 images are not under .*images, e.g. b.png"):
        validate_coco_json(_write(tmp_path, bad), tmp_path / "images")


def test_datasets_without_images_or_annotations_are_errors(tmp_path):
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    with pytest.raises(DatasetError, match=r"empty.json: lists no images"):
        validate_coco_json(_write(tmp_path, empty, "empty.json"), tmp_path / "images")
    unlabelled = {**empty, "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]}
    with pytest.raises(DatasetError, match=r"unlabelled.json: has no annotations for its 1 images"):
        validate_coco_json(_write(tmp_path, unlabelled, "unlabelled.json"), tmp_path / "images")


def test_every_listed_image_must_exist_and_one_listing_per_folder_finds_them(tmp_path, monkeypatch):
    import os

    names = [f"{folder}/{i:03d}.jpg" for folder in ("a", "b", "c") for i in range(100)]
    for name in names:
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        if name not in ("b/007.jpg", "c/099.jpg"):
            (tmp_path / "images" / name).touch()
    (tmp_path / "images" / "c" / "050.jpg").unlink()
    (tmp_path / "images" / "c" / "050.jpg").mkdir()  # a folder is not an image
    coco = {"images": [{"id": i, "file_name": n, "height": 10, "width": 10} for i, n in enumerate(names)],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    listings = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listings.append(path) or scandir(path))
    with pytest.raises(DatasetError) as error:
        validate_coco_json(_write(tmp_path, coco, "big.json"), tmp_path / "images")
    assert str(error.value) == (f"{tmp_path / 'big.json'}: 3 of its 300 images are not under {tmp_path / 'images'}, "
                                "e.g. b/007.jpg, c/050.jpg, c/099.jpg")
    assert len(listings) == 3  # cheap on COCO: a listing per folder, not a stat per image


def test_boxes_beyond_their_image_are_counted_in_a_warning(tmp_path, caplog):
    boxes = [[1, 1, 3, 3], [0, 0, 10.4, 10], [-5, 2, 4, 4], [6, 6, 8, 2], [2, 8, 2, 5]]  # 10 x 10 image
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": b, "iscrowd": 0}
                            for i, b in enumerate(boxes)],
            "categories": [{"id": 1, "name": "thing"}]}
    with caplog.at_level("WARNING", logger="rcmae.detection.data"):
        validate_coco_json(_write(tmp_path, coco), tmp_path / "images")
    # within 1 px (rounding in COCO's own files) is inside
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'ann.json'}: 3 of 5 boxes extend beyond their image (detectron2 clips them to it), "
        "e.g. annotation 2 [-5, 2, 4, 4] in a.png (10x10); annotation 3 [6, 6, 8, 2] in a.png (10x10); "
        "annotation 4 [2, 8, 2, 5] in a.png (10x10)"]


@pytest.mark.slow
def test_demo_trains_with_finite_decreasing_loss(tmp_path):
    from rcmae.tools import train_det

    path, _ = mini_checkpoint(tmp_path)
    out = tmp_path / "det"
    result = train_det.run(["--demo", f"train.output_dir={out}", "train.max_iter=40", "train.eval_period=40",
                            "train.checkpointer.period=30",
                            "lr_multiplier.scheduler.milestones=[35,38]", "lr_multiplier.scheduler.num_updates=40",
                            f"train.init_checkpoint={path}"])
    logs = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if "total_loss" in x]
    assert [r["iteration"] for r in logs] == [9, 19, 29, 39]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in logs)
    # classification, mask and RPN losses fall; the box-regression loss grows at first because it is
    # averaged over all sampled RoIs and more of them become foreground as the RPN learns
    learned = [sum(r[k] for k in ("loss_cls", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")) for r in logs]
    assert learned[-1] < learned[0]
    assert Path(result["visualization"]).is_file() and Path(result["table"]).read_text().count("|") > 10
    evaluated = json.loads(Path(result["results"]).read_text())
    assert 0 <= evaluated["bbox"]["AP"] <= 100 and "segm" in evaluated
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").is_file()
    # --eval-only on the saved model reproduces the end-of-training evaluation
    again = train_det.run(["--demo", "--eval-only", f"train.output_dir={tmp_path / 'det_eval'}",
                           f"train.init_checkpoint={out / 'model_final.pth'}"])
    assert again["box_AP"] == pytest.approx(evaluated["bbox"]["AP"])
    assert again["mask_AP"] == pytest.approx(evaluated["segm"]["AP"])
    # an interrupted run (last checkpoint at iteration 29) resumes from the output dir's pointer
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000029.pth")
    train_det.run(["--demo", "--resume", f"train.output_dir={out}", "train.max_iter=40", "train.eval_period=40",
                   "lr_multiplier.scheduler.milestones=[35,38]", "lr_multiplier.scheduler.num_updates=40"])
    assert "resumed at iteration 30" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").is_file()
    DatasetCatalog.remove("coins_demo")
    MetadataCatalog.remove("coins_demo")
