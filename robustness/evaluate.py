"""``main(cfg)``: evaluate one ImageNet classifier on any subset of ImageNet val / -C / -A / -R / -Sketch
and write JSON, CSV, a Markdown summary in the layout of MAE's Table 13, and a plot.

Every path and layout is checked before the first image. Each finished dataset or ImageNet-C cell is
appended to ``results.jsonl`` as it completes, so a rerun skips what is done; an empty or unreadable
cell is reported in the summary instead of stopping the run. At USR2 or TERM (a SLURM time limit,
preemption, ``scancel``) the run stops after the cell in progress (:mod:`rcmae.core.preemption`); a
job SLURM restarts continues from ``results.jsonl`` whatever its first command line said.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from functools import partial
from pathlib import Path

from rcmae.core.checkpoint import check_checkpoint_option
from rcmae.core.config import load_config
from rcmae.core.data.demo import build_demo_benchmarks
from rcmae.core.data.sampler import shard_loader
from rcmae.core.distributed import all_gather_objects, barrier
from rcmae.core.errors import CheckpointError, ConfigError
from rcmae.core.evaluate import evaluate
from rcmae.core.preemption import Interrupted, stop_requested
from rcmae.core.run import setup_logging, start_run
from rcmae.core.vit import ARCHS
from rcmae.robustness.data import (
    check_wnid_folder,
    class_mask,
    eval_set,
    imagenet_c_cells,
    stored_transform,
)
from rcmae.robustness.defaults import DATASETS
from rcmae.robustness.imagenet_c import make_imagenet_c
from rcmae.robustness.metrics import BENCHMARK, EXTRA, SEVERITIES, corruption_errors
from rcmae.robustness.models import PREPROCESSING, Classifier, check_model_name, load_classifier

log = logging.getLogger(__name__)

LABELS = {"imagenet_val": "ImageNet val", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
          "imagenet_sketch": "ImageNet-Sketch"}
RESULTS = "results.jsonl"
DEMO_FINETUNE = "finetune/demo.yaml"  # a shipped config


def validate(cfg: dict, world: int = 1) -> None:
    """Every setting, path and folder layout, before the first image is read or the demo's are made (and
    before a SLURM submission)."""
    d, m = cfg["data"], cfg["model"]
    if cfg["train"]["resume"] not in ("auto", "none"):
        raise ConfigError(f"train.resume must be auto (skip the cells {RESULTS} holds) or none, "
                          f"got {cfg['train']['resume']!r}")
    if m["preprocessing"] not in PREPROCESSING:
        raise ConfigError(f"model.preprocessing must be one of {PREPROCESSING}, got {m['preprocessing']!r}")
    check_checkpoint_option("model.checkpoint", m["checkpoint"])
    if m["arch"] is not None:
        check_model_name(m["arch"])
    given = [k for k in DATASETS if d[k]]
    if d["source"] == "demo":  # without a checkpoint, the demo fine-tunes its own classifier
        if given:
            raise ConfigError(f"the demo builds its own benchmark trees and would ignore {given}: drop --demo "
                              "(data.source=demo) to evaluate those folders")
        return
    if d["source"] != "folder":
        raise ConfigError(f"data.source must be folder or demo, got {d['source']!r}")
    if not given:
        raise ConfigError("no benchmark folder given: pass any of --imagenet-val, --imagenet-c, --imagenet-a, "
                          "--imagenet-r, --imagenet-sketch (or run the demo: no arguments, or --demo)")
    if m["checkpoint"] is None and (m["arch"] is None or m["arch"] in ARCHS):
        raise ConfigError("model.checkpoint (--checkpoint) is required, or a timm model name as "
                          "model.arch (--model) for timm's pretrained weights")
    for key in ("imagenet_val", "imagenet_sketch"):
        if d[key]:
            check_wnid_folder(d[key], f"data.{key}")
    for key in ("imagenet_a", "imagenet_r"):
        if d[key]:
            class_mask(d[key], key)
    if d["imagenet_c"]:
        imagenet_c_cells(d["imagenet_c"])


def demo_inputs(cfg: dict, run) -> dict:
    """The demo: tiny benchmark trees from real photos and, without a checkpoint, the fine-tuning
    demo's classifier."""
    from rcmae.finetune.defaults import DEFAULTS as FT_DEFAULTS
    from rcmae.finetune.train import main as finetune

    root = run.out_dir / "demo_data"
    corrupt = partial(make_imagenet_c, workers=max(1, cfg["data"]["num_workers"]))
    if run.env.is_main:
        build_demo_benchmarks(root, corrupt)
    barrier()
    sets = build_demo_benchmarks(root, corrupt)  # built: the other processes read where it lies
    cfg["data"].update({k: str(sets["val" if k == "imagenet_val" else k]) for k in DATASETS})
    if cfg["model"]["checkpoint"] is None:
        ft_cfg = load_config(FT_DEFAULTS, DEMO_FINETUNE, [f"train.output_dir={run.out_dir / 'demo_classifier'}",
                                                          f"train.device={run.device.type}"])
        log.info("no model.checkpoint: fine-tuning the demo classifier first (%s)", DEMO_FINETUNE)
        cfg["model"]["checkpoint"] = finetune(ft_cfg)["best_classifier"]
        setup_logging(run.out_dir, run.env.is_main)  # fine-tuning logged to its own directory
    return cfg


def tasks(cfg: dict, clf: Classifier):
    """(key, label, build the dataset, class mask) in evaluation order; building lists the images."""
    import timm.data

    d = cfg["data"]
    val_tf = timm.data.create_transform(**clf.data_config, is_training=False)
    if d["imagenet_val"]:
        yield "imagenet_val", LABELS["imagenet_val"], lambda: eval_set(d["imagenet_val"], val_tf, "imagenet_val"), None
    if d["imagenet_c"]:
        c_tf = val_tf if d["imagenet_c_resize"] else stored_transform(clf.data_config)
        for c, by_severity in imagenet_c_cells(d["imagenet_c"]).items():
            for s, folder in sorted(by_severity.items()):
                yield (f"imagenet_c/{c}/{s}", f"ImageNet-C {c} {s}",
                       lambda folder=folder, c=c, s=s: eval_set(folder, c_tf, f"imagenet_c {c}/{s}"), None)
    for key in ("imagenet_a", "imagenet_r", "imagenet_sketch"):
        if d[key]:
            mask = class_mask(d[key], key) if key != "imagenet_sketch" else None
            yield key, LABELS[key], lambda key=key: eval_set(d[key], val_tf, key), mask


def previous_results(path: Path, fingerprint: dict, resume: str, is_main: bool) -> dict:
    """{key: record} of the finished datasets / cells of an earlier run of the same evaluation; the
    main process reads them and every process gets the same answer."""
    done, error = {}, None
    if is_main and path.exists():
        if resume == "none":
            path.unlink()
        else:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.pop("fingerprint") != fingerprint:
                    error = (f"{path} holds results of another evaluation ({record.get('key')}: other model, "
                             "preprocessing or ImageNet-C protocol): use another --output, or --no-resume")
                    break
                done[record["key"]] = record
    done, error = all_gather_objects((done, error))[0]
    if error:
        raise ConfigError(error)
    return done


def benchmark_classifier(cfg: dict) -> Classifier:
    """The classifier under evaluation, refused if the benchmarks cannot score it (not 1000 ImageNet-1k
    classes; an input size ImageNet-C as stored does not have)."""
    m, d = cfg["model"], cfg["data"]
    clf = load_classifier(m["checkpoint"], m["arch"], m["img_size"], m["preprocessing"], d["crop_pct"])
    num_classes = getattr(clf.model, "num_classes", 1000)
    if num_classes != 1000:
        raise CheckpointError(f"{m['checkpoint']} has a {num_classes}-way head; the benchmarks need the 1000 "
                              "ImageNet-1k classes")
    if d["imagenet_c"] and not d["imagenet_c_resize"] and clf.img_size != 224:
        raise ConfigError(f"ImageNet-C is stored at 224 x 224 and evaluated as stored, but the model takes "
                          f"{clf.img_size} px: pass --imagenet-c-resize to give it the val preprocessing")
    return clf


def main(cfg: dict) -> dict:
    validate(cfg)
    demo = cfg["data"]["source"] == "demo"
    clf = None if demo else benchmark_classifier(cfg)  # a model refused before the run writes anything
    run = start_run(cfg, has_saved_state=lambda out: (out / RESULTS).exists())
    d, env = cfg["data"], run.env
    if demo:  # the demo's model may be fine-tuned in the run first
        cfg = demo_inputs(cfg, run)
        clf = benchmark_classifier(cfg)
    model = clf.model.to(run.device).eval()
    fingerprint = {"model": clf.description, "preprocessing": clf.preprocessing,
                   "data_config": json.loads(json.dumps(clf.data_config)),
                   "imagenet_c": "val preprocessing" if d["imagenet_c_resize"] else "as stored (224 x 224)"}
    log.info("model %s; preprocessing: %s %s; precision %s on %s, %d process(es)", clf.description,
             clf.preprocessing, fingerprint["data_config"], run.precision, run.device, env.world_size)
    results_path = run.out_dir / RESULTS
    records = previous_results(results_path, fingerprint, cfg["train"]["resume"], env.is_main)
    if records:
        log.info("resuming: %d datasets / cells already in %s", len(records), results_path)

    todo = list(tasks(cfg, clf))
    for key, label, dataset, mask in todo:
        if key in records:
            continue
        record = {"key": key}
        try:
            ds = dataset()
        except (FileNotFoundError, ValueError) as e:  # an empty or malformed folder: reported, not fatal
            record.update(status="empty" if isinstance(e, FileNotFoundError) else "error", error=str(e))
            log.warning("%s: %s", label, e)
        else:
            loader = shard_loader(ds, d["batch_size"], env.world_size, env.rank, d["num_workers"],
                                  run.device.type == "cuda")
            t0 = time.perf_counter()
            r = evaluate(model, loader, run.device, run.amp_dtype, class_mask=mask, progress=label)
            r["img_per_s"] = r["n"] / max(time.perf_counter() - t0, 1e-9)
            r["classes"] = int(mask.sum()) if mask is not None else len(set(ds.labels))
            record.update(status="ok" if r["n"] else "unreadable", **r)
            log.info("%s: top-1 %.2f top-5 %.2f on %d images of %d classes (%d unreadable), %.1f img/s", label,
                     r["top1"], r["top5"], r["n"], r["classes"], r["unreadable"], r["img_per_s"])
        records[key] = record
        if env.is_main:
            with open(results_path, "a") as f:
                f.write(json.dumps({**record, "fingerprint": fingerprint}) + "\n")
        # USR2 / TERM: stop between cells (every process asks here, after the same cell), the finished
        # ones kept in results.jsonl for the rerun; never within a cell, where the processes' shares differ
        signum = stop_requested()
        if signum is not None:
            done = sum(k in records for k, *_ in todo)
            stop = Interrupted(signum, f"{done} of {len(todo)} datasets/cells")
            log.warning("%s: the finished ones are in %s", stop, results_path)
            raise stop

    results = assemble(records, clf, fingerprint, run, cfg)
    paths = write_outputs(results, run.out_dir) if env.is_main else {}
    barrier()
    return {"output_dir": str(run.out_dir), "incremental": str(results_path), **paths}


def assemble(records: dict, clf: Classifier, fingerprint: dict, run, cfg: dict) -> dict:
    """The per-dataset records of this run and earlier ones as one result (ImageNet-C scored)."""
    d = cfg["data"]
    results = {"model": clf.description, "settings": {
        **fingerprint, "crop_pct": clf.data_config["crop_pct"], "precision": run.precision,
        "processes": run.env.world_size, "datasets": {k: d[k] for k in DATASETS if d[k]}}}
    problems = {k: f"{r['status']}: {r.get('error', 'no readable image')}" for k, r in records.items()
                if r["status"] != "ok"}
    for key in ("imagenet_val", "imagenet_a", "imagenet_r", "imagenet_sketch"):
        if key in records and key not in problems:
            results[key] = records[key]
    clean_error = 1 - results["imagenet_val"]["top1"] / 100 if "imagenet_val" in results else None
    if d["imagenet_c"]:
        cells = {k[len("imagenet_c/"):]: r for k, r in records.items()
                 if k.startswith("imagenet_c/") and k not in problems}
        errors = {}
        for name, r in cells.items():
            c, s = name.split("/")
            errors.setdefault(c, {})[int(s)] = 1 - r["top1"] / 100
        benchmark = [r for name, r in cells.items() if name.split("/")[0] in BENCHMARK]
        results["imagenet_c"] = {**corruption_errors(errors, clean_error), "cells": cells,
                                 "error": {c: {s: 100 * e for s, e in v.items()} for c, v in errors.items()},
                                 "images": sum(r["n"] for r in benchmark),
                                 "classes": max((r["classes"] for r in benchmark), default=0)}
    results["problems"] = problems
    return results


def write_outputs(results: dict, out_dir: Path) -> dict:
    paths = {"results": out_dir / "robustness.json", "summary": out_dir / "summary.md"}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n")
    c = results.get("imagenet_c")
    if c:
        paths["imagenet_c_table"] = out_dir / "imagenet_c_errors.csv"
        with open(paths["imagenet_c_table"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["corruption", *[f"error_s{s}" for s in SEVERITIES], "mean_error", "CE", "in_mCE", "images"])
            for name in (*BENCHMARK, *EXTRA):
                if name in c["error"]:
                    e, ce = c["error"][name], {**c["CE"], **c["extra_CE"]}.get(name)
                    w.writerow([name, *[f"{e[s]:.2f}" if s in e else "" for s in SEVERITIES],
                                f"{sum(e.values()) / len(e):.2f}", f"{ce:.2f}" if ce is not None else "incomplete",
                                name in BENCHMARK, sum(r["n"] for k, r in c["cells"].items() if k.split("/")[0] == name)])
        paths["plot"] = plot(c, out_dir / "imagenet_c.png")
    paths["summary"].write_text(summary_markdown(results))
    log.info("\n%s", paths["summary"].read_text())
    return {k: str(v) for k, v in paths.items()}


# MAE ViT-B/16 as published: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022),
# Table 13 (robustness; IN-C is mCE) and Table 3 (ImageNet-1K fine-tuning, 224 px).
REFERENCE_ROW = ("MAE ViT-B (He et al. 2022: IN-C/A/R/Sketch Table 13, IN val Table 3)",
                 "51.7", "35.9", "48.3", "34.5", "83.6")


def summary_markdown(r: dict) -> str:
    def top1(key):
        return f"{r[key]['top1']:.1f}" if key in r else "-"

    def count(key, field):
        return f"{r[key][field]:,}" if key in r else "-"

    c = r.get("imagenet_c")
    mce = "-" if not c else (f"{c['mCE']:.1f}" if c["mCE"] is not None else "incomplete")
    keys = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_val")
    lines = [f"# Robustness of {r['model']}", "",
             "| | IN-C mCE (lower is better) | IN-A top-1 | IN-R top-1 | IN-Sketch top-1 | IN val top-1 |",
             "|---|---|---|---|---|---|",
             f"| this model | {mce} | " + " | ".join(top1(k) for k in keys) + " |",
             "| images | " + " | ".join(count(k, "images" if k == "imagenet_c" else "n") for k in ("imagenet_c", *keys)) + " |",
             "| classes | " + " | ".join(count(k, "classes") for k in ("imagenet_c", *keys)) + " |",
             "| " + " | ".join(REFERENCE_ROW) + " |", ""]
    if c:
        lines += [f"ImageNet-C: mCE {c['mCE_status']} (15 corruptions x 5 severities); mean error over the "
                  f"benchmark cells present {c['mean_error']:.2f} (accuracy {c['mean_accuracy']:.2f})"
                  if c["mean_error"] is not None else f"ImageNet-C: mCE {c['mCE_status']}"]
        if c.get("relative_mCE") is not None:
            lines[-1] += (f"; relative mCE {c['relative_mCE']:.1f} (AlexNet clean error {c['alexnet_clean_error']:.2f}, "
                          f"{c['alexnet_clean_error_source']})")
        extra = f"{c['extra_mCE']:.1f}" if c["extra_mCE"] is not None else c["extra_mCE_status"]
        lines += [f"Extra corruptions (not in mCE, AlexNet-normalised as in hendrycks/robustness): mean CE {extra}", "",
                  "| corruption | " + " | ".join(f"s{s}" for s in SEVERITIES) + " | CE | images |",
                  "|---" * (len(SEVERITIES) + 3) + "|"]
        for name in (*BENCHMARK, *EXTRA):
            if name in c["error"]:
                e, ce = c["error"][name], {**c["CE"], **c["extra_CE"]}.get(name)
                shown = f"{ce:.1f}" if ce is not None else "incomplete"
                n = sum(cell["n"] for k, cell in c["cells"].items() if k.split("/")[0] == name)
                lines.append(f"| {name}{' (extra)' if name in EXTRA else ''} | "
                             + " | ".join(f"{e[s]:.1f}" if s in e else "-" for s in SEVERITIES) + f" | {shown} | {n:,} |")
        lines.append("")
    if r.get("problems"):
        lines += ["Not evaluated (reported, not fatal):", ""] + [f"- {k}: {v}" for k, v in r["problems"].items()] + [""]
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
