"""Standalone k-NN evaluation of a backbone checkpoint on a labelled train / val folder pair."""
from __future__ import annotations

import json
import logging

from rcmae.core.checkpoint import check_checkpoint_option, check_which
from rcmae.core.data.datasets import labelled_eval_sets
from rcmae.core.data.readers import check_folder_pair
from rcmae.core.knn import check_knn, knn_evaluate
from rcmae.core.run import start_run
from rcmae.core.vit import build_classifier, check_arch
from rcmae.finetune.models import load_backbone

log = logging.getLogger(__name__)


def validate(cfg: dict, world: int) -> None:
    """Check a config before any work (the folder pair, the checkpoint file, the architecture)."""
    check_arch(cfg["model"]["arch"], cfg["model"]["img_size"])
    check_folder_pair(cfg["data"], "data")
    check_knn(cfg["knn"])
    check_checkpoint_option("init.checkpoint", cfg["init"]["checkpoint"])
    check_which("init.which", cfg["init"]["which"])


def main(cfg: dict) -> dict:
    run = start_run(cfg, validate)  # checked before the output directory is touched
    m, d = cfg["model"], cfg["data"]
    train_set, val_set, num_classes = labelled_eval_sets(d, run.out_dir, run.env.is_main, m["img_size"])
    backbone = build_classifier(m["arch"], m["img_size"], num_classes=0, global_pool="token")
    if cfg["init"]["checkpoint"]:
        load_backbone(backbone, cfg["init"]["checkpoint"], cfg["init"]["which"])
    else:
        log.warning("no init.checkpoint: k-NN on a randomly initialised backbone (a baseline)")
    result = knn_evaluate(backbone.to(run.device), train_set, val_set, num_classes, run.device,
                          run.amp_dtype, cfg["knn"], run.env.world_size, run.env.rank, d["num_workers"])
    result.update(train_images=len(train_set), val_images=len(val_set), checkpoint=cfg["init"]["checkpoint"])
    log.info("k-NN (k=%d, T=%g, %s): top-1 %.2f top-5 %.2f on %d images", cfg["knn"]["k"],
             cfg["knn"]["temperature"], cfg["knn"]["pool"], result["knn_top1"], result["knn_top5"],
             result["knn_n"])
    path = run.out_dir / "knn.json"
    if run.env.is_main:
        path.write_text(json.dumps(result, indent=2) + "\n")
    return {"output_dir": str(run.out_dir), "result": str(path), **{k: v for k, v in result.items()
                                                                     if k.startswith("knn")}}
