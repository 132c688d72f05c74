"""``main(cfg)``: evaluate one ImageNet classifier on any subset of ImageNet val / -C / -A / -R / -Sketch
and write JSON, CSV, a Markdown summary in the layout of MAE's Table 13, and a plot."""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path


from finetune.data import eval_crop_pct, eval_dataset
from finetune.evaluate import evaluate, shard_loader
from finetune.models import build_classifier
from pretrain.checkpoint import CheckpointError, read_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.distributed import barrier
from pretrain.models import ARCHS
from pretrain.run import setup_logging, start_run

from .data import build_demo_benchmarks, class_mask, imagenet_c_cells, imagenet_c_dataset
from .metrics import BENCHMARK, EXTRA, SEVERITIES, corruption_errors

log = logging.getLogger("robustness")

DEFAULTS = {
    "model": {"checkpoint": None, "arch": "vit_base_patch16", "img_size": 224},
    "data": {"imagenet_val": None, "imagenet_c": None, "imagenet_a": None, "imagenet_r": None,
             "imagenet_sketch": None, "imagenet_c_resize": False, "crop_pct": None,
             "batch_size": 128, "num_workers": 8},
    "train": {"output_dir": "output/robustness", "device": "auto", "precision": "auto"},
}
DATASETS = ("imagenet_val", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")
DEMO_FINETUNE = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "demo.yaml"


def load_classifier(checkpoint: str | None, arch: str, img_size: int):
    """A 1000-way classifier from our fine-tuning / linear-probe checkpoints, official MAE fine-tuned
    files (``{"model"}`` with ``head``, ``fc_norm``), timm checkpoints, or a timm model name
    (``arch`` not in our registry, no checkpoint: timm's pretrained weights)."""
    import timm

    if checkpoint is None:
        if arch in ARCHS:
            raise ConfigError("model.checkpoint is required (or a timm model name as model.arch)")
        return timm.create_model(arch, pretrained=True), f"timm:{arch} (pretrained)"
    ckpt = read_checkpoint(checkpoint)
    sd = ckpt.student
    if "head.weight" not in sd:
        raise CheckpointError(f"{checkpoint} ({ckpt.source}) has no classification head: fine-tune it "
                              "first (tools/finetune.py), or pass a classifier checkpoint")
    if ckpt.source == "ours-classifier":
        arch, img_size, pool = ckpt.raw["arch"], ckpt.raw["img_size"], ckpt.raw["global_pool"]
    else:
        pool = "avg" if "fc_norm.weight" in sd else "token"
    num_classes = sd["head.weight"].shape[0]
    if arch in ARCHS:
        model = build_classifier(arch, img_size, num_classes, pool)
    else:
        model = timm.create_model(arch, num_classes=num_classes, global_pool=pool)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit model {arch!r} ({pool} pooling): "
                              f"{str(e).splitlines()[0]} ... set --model to the checkpoint's architecture") from None
    if num_classes != 1000:
        raise CheckpointError(f"{checkpoint} has a {num_classes}-way head; the benchmarks need the "
                              "1000 ImageNet-1k classes")
    return model, f"{checkpoint} ({ckpt.source}, {arch}, {pool} pooling)"


def demo_inputs(cfg: dict, run) -> dict:
    """No dataset given: tiny benchmark trees from real photos and, without a checkpoint, the
    fine-tuning demo's classifier."""
    from finetune.train import DEFAULTS as FT_DEFAULTS
    from finetune.train import main as finetune

    root = run.out_dir / "demo_data"
    if run.env.is_main:
        build_demo_benchmarks(root, workers=max(1, cfg["data"]["num_workers"]))
    barrier()
    sets = build_demo_benchmarks(root)
    cfg["data"].update({k: str(sets["val" if k == "imagenet_val" else k]) for k in DATASETS})
    if cfg["model"]["checkpoint"] is None:
        if not DEMO_FINETUNE.is_file():
            raise ConfigError(f"the demo classifier's config {DEMO_FINETUNE} is missing: pass model.checkpoint")
        ft_cfg = load_config(FT_DEFAULTS, DEMO_FINETUNE, [f"train.output_dir={run.out_dir / 'demo_classifier'}",
                                                          f"train.device={run.device.type}"])
        log.info("no model.checkpoint: fine-tuning the demo classifier first (%s)", DEMO_FINETUNE)
        cfg["model"]["checkpoint"] = finetune(ft_cfg)["best_classifier"]
        setup_logging(run.out_dir, run.env.is_main)  # fine-tuning logged to its own directory
    return cfg


def main(cfg: dict) -> dict:
    run = start_run(cfg)
    d = cfg["data"]
    if not any(d[k] for k in DATASETS):
        cfg = demo_inputs(cfg, run)
        d = cfg["data"]
    model, described = load_classifier(cfg["model"]["checkpoint"], cfg["model"]["arch"], cfg["model"]["img_size"])
    model = model.to(run.device).eval()
    size, env = cfg["model"]["img_size"], run.env
    crop_pct = eval_crop_pct(size, d["crop_pct"])
    log.info("model %s; precision %s on %s, %d process(es)", described, run.precision, run.device, env.world_size)

    def score(dataset, label, mask=None):
        loader = shard_loader(dataset, d["batch_size"], env.world_size, env.rank, d["num_workers"],
                              run.device.type == "cuda")
        t0 = time.perf_counter()
        r = evaluate(model, loader, run.device, run.amp_dtype, class_mask=mask, progress=label)
        r["img_per_s"] = r["n"] / max(time.perf_counter() - t0, 1e-9)
        log.info("%s: top-1 %.2f top-5 %.2f on %d images (%d unreadable), %.1f img/s", label, r["top1"],
                 r["top5"], r["n"], r["unreadable"], r["img_per_s"])
        return r

    results = {"model": described, "settings": {
        "img_size": size, "crop_pct": crop_pct, "val_preprocessing": f"resize {round(size / crop_pct)} bicubic + "
        f"centre crop {size}", "imagenet_c_preprocessing": "val pipeline" if d["imagenet_c_resize"]
        else "as stored (224 x 224)", "precision": run.precision, "processes": env.world_size,
        "datasets": {k: d[k] for k in DATASETS if d[k]}}}
    clean_error = None
    if d["imagenet_val"]:
        r = score(eval_dataset(d["imagenet_val"], "imagenet1k", size, crop_pct, "imagenet_val")[0], "ImageNet val")
        results["imagenet_val"] = r
        clean_error = 1 - r["top1"] / 100
    if d["imagenet_c"]:
        errors, cells = {}, {}
        for c, by_severity in imagenet_c_cells(d["imagenet_c"]).items():
            for s, folder in sorted(by_severity.items()):
                r = score(imagenet_c_dataset(folder, d["imagenet_c_resize"], crop_pct, size), f"ImageNet-C {c} {s}")
                errors.setdefault(c, {})[s] = 1 - r["top1"] / 100
                cells[f"{c}/{s}"] = r
        results["imagenet_c"] = {**corruption_errors(errors, clean_error), "cells": cells,
                                 "error": {c: {s: 100 * e for s, e in v.items()} for c, v in errors.items()}}
    for key, label in (("imagenet_a", "ImageNet-A"), ("imagenet_r", "ImageNet-R")):
        if d[key]:
            mask = class_mask(d[key], key)
            results[key] = {**score(eval_dataset(d[key], "imagenet1k", size, crop_pct, key)[0], label, mask),
                            "classes": int(mask.sum())}
    if d["imagenet_sketch"]:
        results["imagenet_sketch"] = score(eval_dataset(d["imagenet_sketch"], "imagenet1k", size, crop_pct,
                                                        "imagenet_sketch")[0], "ImageNet-Sketch")
    paths = write_outputs(results, run.out_dir) if env.is_main else {}
    barrier()
    return {"output_dir": str(run.out_dir), **paths}


def write_outputs(results: dict, out_dir: Path) -> dict:
    paths = {"results": out_dir / "robustness.json", "summary": out_dir / "summary.md"}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    c = results.get("imagenet_c")
    if c:
        paths["imagenet_c_table"] = out_dir / "imagenet_c_errors.csv"
        with open(paths["imagenet_c_table"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["corruption", *[f"error_s{s}" for s in SEVERITIES], "mean_error", "CE", "in_mCE"])
            for name in (*BENCHMARK, *EXTRA):
                if name in c["error"]:
                    e = c["error"][name]
                    w.writerow([name, *[f"{e[s]:.2f}" if s in e else "" for s in SEVERITIES],
                                f"{sum(e.values()) / len(e):.2f}",
                                f"{c['CE'][name]:.2f}" if name in c["CE"] else "", name in BENCHMARK])
        paths["plot"] = plot(c, out_dir / "imagenet_c.png")
    paths["summary"].write_text(summary_markdown(results))
    log.info("\n%s", paths["summary"].read_text())
    return {k: str(v) for k, v in paths.items()}


def summary_markdown(r: dict) -> str:
    def top1(key):
        return f"{r[key]['top1']:.1f}" if key in r else "-"

    c = r.get("imagenet_c")
    mce = "-" if not c else (f"{c['mCE']:.1f}" if c["mCE"] is not None else "incomplete")
    lines = [f"# Robustness of {r['model']}", "",
             "| | IN-C mCE (lower is better) | IN-A top-1 | IN-R top-1 | IN-Sketch top-1 | IN val top-1 |",
             "|---|---|---|---|---|---|",
             f"| this model | {mce} | {top1('imagenet_a')} | {top1('imagenet_r')} | {top1('imagenet_sketch')} "
             f"| {top1('imagenet_val')} |",
             "| MAE ViT-B (paper, Table 13) | 51.7 | 35.9 | 48.3 | 34.5 | 83.6 |", ""]
    if c:
        lines += [f"ImageNet-C: {c['mCE_status']}; mean error over the cells present {c['mean_error']:.2f} "
                  f"(accuracy {c['mean_accuracy']:.2f})"
                  + (f"; relative mCE {c['relative_mCE']:.1f} (AlexNet clean error {c['alexnet_clean_error']:.2f}, "
                     f"{c['alexnet_clean_error_source']})" if c.get("relative_mCE") is not None else ""), "",
                  "| corruption | " + " | ".join(f"s{s}" for s in SEVERITIES) + " | CE |",
                  "|---" * (len(SEVERITIES) + 2) + "|"]
        for name in (*BENCHMARK, *EXTRA):
            if name in c["error"]:
                e = c["error"][name]
                ce = f"{c['CE'][name]:.1f}" if name in c["CE"] else "(held out)"
                lines.append(f"| {name} | " + " | ".join(f"{e[s]:.1f}" if s in e else "-" for s in SEVERITIES)
                             + f" | {ce} |")
        lines.append("")
    lines.append(f"Settings: {json.dumps(r['settings'])}")
    return "\n".join(lines) + "\n"


def plot(c: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    ax1.set_prop_cycle(color=plt.cm.tab20(range(20)))  # 19 corruptions: 19 colours
    for name, e in c["error"].items():
        ax1.plot(sorted(e), [e[s] for s in sorted(e)], marker="o", label=name,
                 linestyle="-" if name in BENCHMARK else "--")
    ax1.set(xlabel="severity", ylabel="top-1 error (%)", title="ImageNet-C error by severity", xticks=SEVERITIES)
    ax1.legend(fontsize=7, ncol=2)
    names = [n for n in BENCHMARK if n in c["CE"]]
    ax2.bar(range(len(names)), [c["CE"][n] for n in names])
    ax2.axhline(100, color="gray", linestyle=":", label="AlexNet = 100")
    ax2.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    mce = f"mCE {c['mCE']:.1f}" if c["mCE"] is not None else "mCE incomplete"
    ax2.set(ylabel="CE (%)", title=f"Corruption error per corruption ({mce})")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
