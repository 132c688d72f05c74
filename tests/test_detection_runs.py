"""Runs of tools/train_det.py: the checks made before a run starts or is submitted, the starting
weights (no silent random backbone, no silently skipped tensor), the upstream schedules, and
multi-process training and evaluation (gloo on CPU) against one process."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("detectron2", reason="run tools/install_detectron2.sh")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from fixtures import ROOT  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from rcmae.core import checkpoint as ck  # noqa: E402
from rcmae.core.errors import ConfigError  # noqa: E402
from rcmae.detection.checkpoint import load_detector  # noqa: E402
from rcmae.detection.data import build_coins_dataset, register_coco  # noqa: E402
from rcmae.detection.preflight import load_config, unknown_arguments  # noqa: E402
from rcmae.detection.train import do_test, main  # noqa: E402
from rcmae.pretrain.models import build_mae  # noqa: E402
from rcmae.tools import train_det  # noqa: E402

CONFIGS = ROOT / "configs" / "detection"
DEMO = CONFIGS / "demo_tiny.py"
B = CONFIGS / "mask_rcnn_vitdet_b_100ep.py"
# no coin of the demo set is small (< 32^2 px) or large (> 96^2 px): COCO reports NaN for those sizes
NAN_SIZES = ("APs", "APl")


@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    return build_coins_dataset(tmp_path_factory.mktemp("coins"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A pretraining checkpoint of the demo's ViT-mini (our format)."""
    torch.manual_seed(0)
    student = build_mae("vit_mini_patch8", 64, 32, 1, 2)
    path = tmp_path_factory.mktemp("backbone") / "pretrain.pth"
    torch.save({"format": ck.FORMAT, "student": student.state_dict(), "teacher": student.state_dict()}, path)
    return path


def same_metrics(a: dict, b: dict) -> bool:
    """Equal COCO results (``bbox`` and ``segm``; ``evaluated`` says after which iteration), NaN (no object
    of that size) equal to NaN."""
    tasks = ("bbox", "segm")
    return all(t in a and t in b for t in tasks) and all(
        a[t].keys() == b[t].keys() and all(x == y or (math.isnan(x) and math.isnan(y))
                                           for x, y in zip(a[t].values(), b[t].values())) for t in tasks)


# ----------------------------------------------------------------------------- checks before the run
def dry_run(capsys, coins, backbone, options=(), overrides=()):
    """A SLURM dry run of the ViT-B recipe on the coins set (later options and overrides win)."""
    train_det.run(["--config-file", str(B), "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                   "--dry-run", "--dataset", "coins", *map(str, coins), *options,
                   "dataloader.train.dataset.names=coins", "dataloader.test.dataset.names=coins",
                   f"train.init_checkpoint={backbone}", *overrides])
    return capsys.readouterr().out


def test_dry_run_prints_the_job_when_everything_checks(capsys, coins, backbone):
    out = dry_run(capsys, coins, backbone)
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --signal=USR2@120" in out


@pytest.mark.parametrize("options, overrides, message", [
    (["--dataset", "coins", "/nowhere/train.json", "/nowhere/images"], [],
     "dataset coins: annotation file /nowhere/train.json does not exist"),
    ([], ["dataloader.train.total_batch_size=24"],  # 2 nodes x 8 GPUs = 16 processes
     "dataloader.train.total_batch_size=24 does not divide among 16 processes"),
    ([], ["train.init_checkpoint=/nowhere/rcmae_b.pth"], "train.init_checkpoint=/nowhere/rcmae_b.pth does not exist"),
    ([], ["train.init_checkpoint="], "train.init_checkpoint is empty: the backbone would start from random weights"),
    ([], ["train.max_iters=10"], "the config has no key train.max_iters (did you mean train.max_iter?)"),
    ([], ["dataloader.test.dataset.names=cocos"], "dataset cocos (dataloader.test.dataset.names) is not registered"),
    ([], ["dataloader.test.dataset.names=coco_2017_val"],
     "dataset coco_2017_val (a detectron2 builtin, found under $DETECTRON2_DATASETS, default ./datasets): annotation"),
    ([], ["--dataset"], "override '--dataset' is not key=value (options such as --dataset go before the key=value"),
])
def test_dry_run_fails_before_submitting(capsys, coins, backbone, options, overrides, message):
    with pytest.raises(SystemExit) as exit_:
        dry_run(capsys, coins, backbone, options, overrides)
    assert message in str(exit_.value)
    assert capsys.readouterr().out == ""  # no sbatch script, nothing submitted


def test_misspelt_config_arguments_are_found_without_building():
    cfg = LazyConfig.load(str(B))
    assert unknown_arguments(cfg) == []
    cfg.model.backbone.net.embed_dims = 512
    cfg.dataloader.train.mapper.augmentations[1].max_scal = 2.0
    assert unknown_arguments(cfg) == [
        "dataloader.train.mapper.augmentations[1].max_scal: not an argument of ResizeScale",
        "model.backbone.net.embed_dims: not an argument of ViT"]


# ----------------------------------------------------------------------------- starting weights
def test_paper_recipes_refuse_a_random_backbone_unless_asked(tmp_path):
    args = train_det.parse_args(["--config-file", str(B), f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.init_checkpoint is empty.*train.allow_scratch=True"):
        main(args)  # the check holds for any caller, not only the command line
    assert not any(tmp_path.iterdir())  # failed before writing anything
    for name in ("mask_rcnn_vitdet_b_100ep", "mask_rcnn_vitdet_l_100ep", "mask_rcnn_vitdet_h_75ep"):
        cfg = LazyConfig.load(str(CONFIGS / f"{name}.py"))
        assert cfg.train.init_checkpoint == "" and cfg.train.allow_scratch is False
    assert LazyConfig.load(str(DEMO)).train.allow_scratch is True  # the CPU demo says so explicitly


def test_eval_only_needs_weights(capsys):
    with pytest.raises(SystemExit, match="--eval-only needs the detector's weights: train.init_checkpoint=PATH"):
        train_det.run(["--demo", "--eval-only"])


def demo_detector(pretrain_img_size=128, seed=0):
    cfg = LazyConfig.load(str(DEMO))
    cfg.model.backbone.net.pretrain_img_size = pretrain_img_size
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def test_eval_only_with_another_position_grid_names_the_override(tmp_path):
    saved = demo_detector(pretrain_img_size=96)  # a 6x6 grid (37 positions); the demo config has 8x8 (65)
    torch.save({"model": saved.state_dict()}, tmp_path / "model.pth")
    with pytest.raises(SystemExit) as exit_:
        train_det.run(["--demo", "--eval-only", f"train.output_dir={tmp_path / 'eval'}",
                       f"train.init_checkpoint={tmp_path / 'model.pth'}"])
    assert str(exit_.value) == (
        f"error: {tmp_path / 'model.pth'} does not fit the model of the config: backbone.net.pos_embed holds a "
        "6x6 position grid (37 positions), the config a 8x8 one (pretrain_img_size 128 / patch 16); detectron2's "
        "ViT resizes the stored grid to the input's at run time, so add the override "
        "model.backbone.net.pretrain_img_size=96 to use these weights as they were trained")
    # with that override every tensor is the saved one, pos_embed included: the model that was saved
    model = demo_detector(pretrain_img_size=96, seed=1)
    assert not torch.equal(model.backbone.net.pos_embed, saved.backbone.net.pos_embed)
    load_detector(model, str(tmp_path / "model.pth"), str(tmp_path), resume=False)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())


def test_eval_only_refuses_a_checkpoint_without_the_heads(tmp_path):
    sd = {k: v for k, v in demo_detector().state_dict().items() if k.startswith("backbone.net.")}
    torch.save({"model": sd}, tmp_path / "backbone_only.pth")
    with pytest.raises(ck.CheckpointError, match=r"backbone_only.pth does not fit .* tensors of the model are not in "
                                                 r"the checkpoint .*not a checkpoint of this detector"):
        load_detector(demo_detector(), str(tmp_path / "backbone_only.pth"), str(tmp_path), resume=False)


# ----------------------------------------------------------------------------- upstream recipe values
def test_schedules_and_vit_h_optimizer_match_upstream():
    # detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b_100ep,h_75ep}.py at 02b5c4e2:
    # B/L milestones [163889, 177546] of 184375; H: max_iter 184375 * 3 // 4, milestones * 3 // 4,
    # optimizer.params.overrides = {} and weight_decay_norm = None, and B's warmup_length 250 / 184375
    # left as it is (a fraction of the schedule: ~187.5 iterations of H's 138,281, not 250)
    upstream_warmup = 250 / 184375
    for name, max_iter, milestones in (("mask_rcnn_vitdet_b_100ep", 184375, [163889, 177546]),
                                       ("mask_rcnn_vitdet_l_100ep", 184375, [163889, 177546]),
                                       ("mask_rcnn_vitdet_h_75ep", 138281, [122916, 133159]),
                                       ("cascade_mask_rcnn_vitdet_h_75ep", 138281, [122916, 133159])):
        cfg = LazyConfig.load(str(CONFIGS / f"{name}.py"))
        assert cfg.train.max_iter == max_iter and cfg.lr_multiplier.scheduler.num_updates == max_iter, name
        assert list(cfg.lr_multiplier.scheduler.milestones) == milestones, name
        assert cfg.lr_multiplier.warmup_length == upstream_warmup, name
    assert 138281 * upstream_warmup == pytest.approx(187.5, abs=0.01)
    decays = {}
    for name in ("mask_rcnn_vitdet_b_100ep", "mask_rcnn_vitdet_h_75ep"):
        cfg = LazyConfig.load(str(CONFIGS / f"{name}.py"))
        cfg.model.backbone.net.embed_dim = 32  # every block, at a tiny width
        model = instantiate(cfg.model)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        decays[name] = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    b, h = decays["mask_rcnn_vitdet_b_100ep"], decays["mask_rcnn_vitdet_h_75ep"]
    norm, proj = "backbone.net.blocks.0.norm1.weight", "backbone.net.blocks.0.attn.qkv.weight"
    assert (b["backbone.net.pos_embed"], b[norm], b[proj]) == (0.0, 0.0, 0.1)  # B/L: no decay on pos_embed, norms
    assert (h["backbone.net.pos_embed"], h[norm], h[proj]) == (0.1, 0.1, 0.1)  # H: weight decay 0.1 on all


# ----------------------------------------------------------------------------- several processes
class Oracle(torch.nn.Module):
    """A "detector" that returns the ground truth of its images with score 1, or nothing."""

    def __init__(self, dataset: str, predicts: bool):
        super().__init__()
        self.truth = {d["image_id"]: d["annotations"] for d in DatasetCatalog.get(dataset)}
        self.predicts = predicts

    def forward(self, batch):
        outputs = []
        for image in batch:
            h, w = image["height"], image["width"]
            anns = self.truth[image["image_id"]] if self.predicts else []
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                                                  for a in anns], dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(len(anns))
            inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
            masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) for a in anns]
            inst.pred_masks = torch.from_numpy(np.stack(masks)).bool() if anns else torch.zeros(0, h, w).bool()
            outputs.append({"instances": inst})
        return outputs


def evaluate_on_two_ranks(rank: int, coins: tuple, out: Path):
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    register_coco("coins_two_ranks", *coins)
    cfg = load_config(str(DEMO), [f"train.output_dir={out}", "dataloader.test.dataset.names=coins_two_ranks"])
    results = {"rank 1 only": do_test(cfg, Oracle("coins_two_ranks", predicts=rank == 1)),
               "nothing": do_test(cfg, Oracle("coins_two_ranks", predicts=False))}
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # neither process leaves while the other still talks to it
    dist.destroy_process_group()


def test_evaluation_on_two_processes_returns_the_results_on_both(tmp_path, coins):
    mp.spawn(evaluate_on_two_ranks, args=(coins, tmp_path), nprocs=2)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # rank 1 predicts its 2 of the 4 images exactly: precision 1 up to recall 0.5, so AP averages
        # precision 1 over 51 of COCO's 101 recall thresholds
        for task in ("bbox", "segm"):
            half = results["rank 1 only"][task]
            assert half["AP"] == pytest.approx(100 * 51 / 101) and half["AP50"] == pytest.approx(100 * 51 / 101)
            assert all(math.isnan(half[k]) for k in NAN_SIZES), half  # not zeroed: there were detections
            nothing = results["nothing"][task]
            assert nothing["AP"] == 0.0 and nothing["AP50"] == 0.0, nothing


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one(tmp_path, backbone):
    # the README's commands: training from a pretraining checkpoint, then --eval-only of its model,
    # with 2 processes (detectron2's launch; gloo on CPU) and with 1
    schedule = ["train.max_iter=4", "train.eval_period=4", "lr_multiplier.scheduler.milestones=[2,3]",
                "lr_multiplier.scheduler.num_updates=4"]
    two = ["--num-gpus", "2", "--dist-url", "auto"]  # a free port: detectron2's default is fixed per user
    train_det.run(["--demo", *two, f"train.output_dir={tmp_path / 'train'}", f"train.init_checkpoint={backbone}",
                   *schedule])
    log = (tmp_path / "train" / "log.txt").read_text()
    assert "World size: 2" in log and "iter: 3" in log
    trained = json.loads((tmp_path / "train" / "eval_results.json").read_text())  # evaluated on 2 processes
    final = tmp_path / "train" / "model_final.pth"
    one = train_det.run(["--demo", "--eval-only", f"train.output_dir={tmp_path / 'one'}", f"train.init_checkpoint={final}"])
    train_det.run(["--demo", "--eval-only", *two, f"train.output_dir={tmp_path / 'two'}",
                   f"train.init_checkpoint={final}"])
    single = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    double = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert single["bbox"]["AP50"] > 0  # a comparison of detections, not of empty outputs
    assert same_metrics(single, double) and same_metrics(single, trained)
    # what each evaluation rests on: the 4 coin photos, after the last of 4 iterations or of none (--eval-only)
    assert trained["evaluated"] == {"dataset": "coins_demo", "images": 4, "iteration": 4, "max_iter": 4}
    assert single["evaluated"] == {"dataset": "coins_demo", "images": 4, "iteration": None, "max_iter": None}
    assert double["evaluated"] == single["evaluated"]
    assert (one["box_AP"], one["mask_AP"]) == (single["bbox"]["AP"], single["segm"]["AP"])

    def detections(run):
        found = json.loads((tmp_path / run / "inference" / "coco_instances_results.json").read_text())
        return sorted((d["image_id"], round(d["score"], 5), [round(v, 2) for v in d["bbox"]]) for d in found)

    assert detections("one") == detections("two")


def test_the_demo_runs_only_without_arguments_or_with_demo(capsys):
    """Real settings never fall back to the demo config: without --config-file they are an error."""
    with pytest.raises(SystemExit):
        train_det.parse_args(["--num-gpus", "8", "train.init_checkpoint=mae_pretrain_vit_base.pth"])
    assert "--config-file is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_det.parse_args(["--demo", "--config-file", str(B)])
    assert "--demo runs the demo config" in capsys.readouterr().err
    assert train_det.parse_args([]).config_file == train_det.parse_args(["--demo"]).config_file == str(DEMO)
