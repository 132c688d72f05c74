"""The report card's content: one row per backbone in the paper's layout, the published numbers of the
same sizes with their sources, the curves, the cost of each backbone and every job's state. Every number
comes from a job's folder with its image count and links to that folder and its log; a number that is
not there is marked with why, never filled. :func:`rcmae.benchmark.report.write_report` renders it."""
from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from pathlib import Path

import yaml

from rcmae.benchmark.collect import read_jsonl
from rcmae.benchmark.plan import Backbone, Job, Settings
from rcmae.benchmark.runner import CONSOLE, JobState, read_record
from rcmae.core.config import config_path

DETECTION_NAMES = {"vitdet": "ViTDet", "paper": "paper protocol"}


def columns(detection: str) -> list[dict]:
    """The paper's table: ImageNet-1K fine-tuning, linear probe, k-NN; COCO box / mask AP under the named
    detection protocol; ImageNet-C mCE, -A, -R, -Sketch."""
    def col(key, label, protocol, unit="%", better="higher"):
        return {"key": key, "label": label, "unit": unit, "better": better, "protocol": protocol}

    name = DETECTION_NAMES[detection]
    return [col("finetune_top1", "IN-1K fine-tune top-1", "finetune"),
            col("linprobe_top1", "IN-1K linear probe top-1", "linprobe"),
            col("knn_top1", "IN-1K k-NN top-1", "knn"),
            col(f"coco_box_ap_{detection}", f"COCO AP box ({name})", "detection", "AP"),
            col(f"coco_mask_ap_{detection}", f"COCO AP mask ({name})", "detection", "AP"),
            col("in_c_mce", "IN-C mCE", "robustness", better="lower"),
            col("in_a_top1", "IN-A top-1", "robustness"),
            col("in_r_top1", "IN-R top-1", "robustness"),
            col("in_sketch_top1", "IN-Sketch top-1", "robustness")]


def rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def log_of(job: Job) -> Path:
    """The tool's own log when it wrote one, else the console output the benchmark kept."""
    log = Path(job.dir) / "log.txt"
    return log if log.is_file() else Path(job.dir) / CONSOLE


def backbone_cells(b: Backbone, jobs: dict[str, Job], states: dict[str, JobState], cols: list[dict],
                   root: Path) -> dict:
    cells = {}
    for c in cols:
        job = jobs.get(f"{b.name}/{c['protocol']}")
        if job is None:
            cells[c["key"]] = {"value": None, "status": "missing", "note": f"{c['protocol']} not planned"}
            continue
        st = states[job.name]
        found = st.outcome.cells.get(c["key"])
        links = {"job_dir": rel(Path(job.dir), root), "log": rel(log_of(job), root)}
        if found is None or found["value"] is None:
            status = st.state if st.state != "done" else "missing"
            note = (found or {}).get("note") or st.detail or missing_reason(c)
            cells[c["key"]] = {"value": None, "status": status, "note": note, **links}
            continue
        partial = found["partial"] or st.state != "done"
        cells[c["key"]] = {"value": round(found["value"], 2), "status": "partial" if partial else "done",
                           "images": found["images"], "note": found["note"], **links}
    return cells


def missing_reason(col: dict) -> str:
    if col["protocol"] == "robustness":
        return "dataset not given (--imagenet-c / -a / -r / -sketch)"
    return "no result"


def published_rows(sizes: list[str], cols: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The published numbers of the backbones' sizes for the table's columns, sources numbered in order."""
    data = yaml.safe_load(config_path("benchmark/published.yaml").read_text())
    keys = [c["key"] for c in cols]
    rows, numbers = [], {}
    for size in dict.fromkeys(sizes):
        for method, by_size in data["results"].items():
            entries = {k: v for k, v in by_size.get(size, {}).items() if k in keys}
            if not entries:
                continue
            cells = {}
            for key, entry in entries.items():
                number = numbers.setdefault(entry["source"], str(len(numbers) + 1))
                cells[key] = {"value": entry["value"], "source": number}
            rows.append({"method": method, "size": size, "label": f"{method} ViT-{size[0].upper()} (published)",
                         "cells": cells})
    return rows, {n: data["sources"][key] for key, n in numbers.items()}


def figures(backbones: list[Backbone], jobs: dict[str, Job], states: dict[str, JobState]) -> dict:
    out = {}
    for b in backbones:
        if b.run_dir:
            records = read_jsonl(Path(b.run_dir) / "metrics.jsonl")
            curves = {"loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
                      "knn_top1": [[r["step"], r["knn_top1"]] for r in records if "knn_top1" in r]}
            if curves["loss"]:
                out.setdefault("pretraining", {})[b.name] = curves
        for protocol in ("finetune", "linprobe", "robustness", "detection"):
            st = states.get(f"{b.name}/{protocol}")
            if st is not None and st.outcome.figures:
                out.setdefault(protocol, {})[b.name] = st.outcome.figures
    return out


def costs(backbones: list[Backbone], jobs: dict[str, Job], states: dict[str, JobState], root: Path) -> list[dict]:
    rows = []
    for b in backbones:
        job = jobs.get(f"{b.name}/cost")
        if job is None:
            continue
        st = states[job.name]
        keep = ("params_m", "gflops_per_image", "flops_counting", "throughput_img_per_s", "batch_size",
                "precision", "device", "peak_memory_gib", "memory_kind")
        rows.append({"backbone": b.name, "status": st.state, **{k: st.outcome.result.get(k) for k in keep},
                     "job_dir": rel(Path(job.dir), root), "log": rel(log_of(job), root)})
    return rows


def pictures(backbones: list[Backbone], jobs: dict[str, Job], states: dict[str, JobState], root: Path) -> list[dict]:
    """Each backbone's feature pictures (paths relative to the report), or the state of the job drawing them."""
    rows = []
    for b in backbones:
        job = jobs.get(f"{b.name}/pictures")
        if job is not None:
            drawn = states[job.name].outcome.result
            rows.append({"backbone": b.name, "status": states[job.name].state, "log": rel(log_of(job), root),
                         **{kind: rel(Path(path), root) for kind, path in drawn.items()}})
    return rows


def job_rows(jobs: list[Job], states: dict[str, JobState], root: Path, planned) -> list[dict]:
    rows = []
    for job in jobs:
        st = states[job.name]
        attempts = read_record(job)["attempts"]
        cmd = attempts[-1]["command"] if attempts else planned(job)
        progress = st.outcome.progress or st.detail
        rows.append({"name": job.name, "backbone": job.backbone, "protocol": job.protocol, "state": st.state,
                     "job_dir": rel(Path(job.dir), root), "log": rel(log_of(job), root),
                     "command": shlex.join(cmd), "progress": progress,
                     **({"slurm_id": st.slurm_id} if st.slurm_id else {})})
    return rows


def report_card(backbones: list[Backbone], jobs: list[Job], states: dict[str, JobState], s: Settings,
                root: Path, command: str, planned) -> dict:
    """The report dict (see :mod:`rcmae.benchmark.report` for how it is shown). ``planned(job)`` gives the
    command line of a job that has not run yet."""
    by_name = {j.name: j for j in jobs}
    cols = columns(s.detection)
    published, sources = published_rows([b.size for b in backbones], cols)
    rows = [{"backbone": b.name, "source": b.checkpoint or f"random:{b.arch}", "origin": b.origin,
             "arch": b.arch, "size": b.size, "img_size": b.img_size, "run_dir": b.run_dir,
             "cells": backbone_cells(b, by_name, states, cols, root)} for b in backbones]
    return {"title": "RC-MAE benchmark", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "preset": s.preset, "protocols": s.protocols, "columns": cols, "rows": rows,
            "published": published, "sources": sources, "figures": figures(backbones, by_name, states),
            "costs": costs(backbones, by_name, states, root), "pictures": pictures(backbones, by_name, states, root),
            "jobs": job_rows(jobs, states, root, planned)}
