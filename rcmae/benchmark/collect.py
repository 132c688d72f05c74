"""What each job's folder says: finished or not, how far, its numbers (with the image counts they rest
on) and its curves, read from the files the tools write (``knn.json``, ``metrics.jsonl``,
``eval_results.json``, ``robustness.json``, ``cost.json``), never from the benchmark's own memory."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rcmae.benchmark.plan import Job


@dataclass
class Outcome:
    """A job's folder, read: ``done`` when the tool finished; ``started`` when it left state to resume
    from; ``cells`` the report's numbers by column (``value``, ``images``, ``note``; ``partial`` when
    not final); ``figures`` its curves by kind; ``result`` the tool's own result (cost.json, ...)."""
    done: bool = False
    started: bool = False
    progress: str = ""
    cells: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a line being written is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cell(value, images, note="", partial=False) -> dict:
    return {"value": value, "images": images, "note": note, "partial": partial}


def outcome(job: Job) -> Outcome:
    return READERS[job.protocol](Path(job.dir), job)


def read_export(d: Path, job: Job) -> Outcome:
    done = (d / "encoder.pth").is_file() and (d / "encoder" / "config.json").is_file()
    return Outcome(done=done, progress="exported" if done else "")


def read_cost(d: Path, job: Job) -> Outcome:
    result = read_json(d / "cost.json")
    if result is None:
        return Outcome()
    progress = (f"{result['gflops_per_image']:.4g} GFLOPs, {result['throughput_img_per_s']:.1f} img/s "
                f"({result['device']})")
    return Outcome(done=True, started=True, progress=progress, result=result)


def read_knn(d: Path, job: Job) -> Outcome:
    r = read_json(d / "knn.json")
    if r is None:
        return Outcome()
    note = f"k-NN on {r['train_images']:,} train images"
    return Outcome(done=True, started=True, progress=f"{r['knn_n']:,} val images classified",
                   cells={"knn_top1": cell(r["knn_top1"], r["knn_n"], note)})


def read_classifier(d: Path, job: Job) -> Outcome:
    """Fine-tuning and linear probing: the last evaluation's top-1 (the final model's, as published),
    finished when it is the last epoch's."""
    records = read_jsonl(d / "metrics.jsonl")
    evals = [r for r in records if "eval_top1" in r]
    losses = [[r["epoch"], r["loss"]] for r in records if "loss" in r]
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else None
    epochs = config["optim"]["epochs"] if config else None
    out = Outcome(started=bool(records) or (d / "last_checkpoint").is_file())
    if losses or evals:
        out.figures = {"train_loss": losses, "val_top1": [[r["epoch"], r["eval_top1"]] for r in evals]}
    if not evals:
        return out
    last, best = evals[-1], max(evals, key=lambda r: r["eval_top1"])
    out.done = epochs is not None and last["epoch"] >= epochs
    out.progress = f"epoch {last['epoch']:g} of {epochs}"
    note = f"final epoch {last['epoch']:g} of {epochs} (best {best['eval_top1']:.2f} at epoch {best['epoch']:g})"
    if not out.done:
        note = f"not finished: evaluated at epoch {last['epoch']:g} of {epochs}"
    out.cells = {f"{job.protocol}_top1": cell(last["eval_top1"], last["eval_n"], note, partial=not out.done)}
    return out


def read_detection(d: Path, job: Job) -> Outcome:
    """COCO box / mask AP of the evaluation after the last iteration (``eval_results.json`` says which
    iteration and how many images); the AP by object size for the figure."""
    metrics = read_jsonl(d / "metrics.json")
    out = Outcome(started=(d / "last_checkpoint").is_file())
    trained = [r["iteration"] for r in metrics if "total_loss" in r]
    result = read_json(d / "eval_results.json")
    if result is None or "evaluated" not in result:
        out.progress = f"iteration {trained[-1] + 1}" if trained else ""
        return out
    ev = result["evaluated"]
    out.done = (d / "model_final.pth").is_file() and ev.get("iteration") == ev.get("max_iter")
    out.progress = f"iteration {ev.get('iteration')} of {ev.get('max_iter')}"
    protocol = job.section.removeprefix("detection_")
    note = f"{'final' if out.done else 'not finished: evaluated at'} iteration {ev.get('iteration')} of " \
           f"{ev.get('max_iter')} on {ev.get('dataset')}"
    out.cells = {f"coco_{kind}_ap_{protocol}": cell(finite(result[task]["AP"]), ev["images"], note,
                                                    partial=not out.done)
                 for kind, task in (("box", "bbox"), ("mask", "segm")) if task in result}
    out.figures = {kind: {k: finite(result[task].get(k)) for k in ("APs", "APm", "APl")}
                   for kind, task in (("box", "bbox"), ("mask", "segm")) if task in result}
    return out


def finite(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def read_robustness(d: Path, job: Job) -> Outcome:
    r = read_json(d / "robustness.json")
    cells_done = len(read_jsonl(d / "results.jsonl"))
    out = Outcome(started=cells_done > 0, progress=f"{cells_done} datasets / cells evaluated" if cells_done else "")
    if r is None:
        return out
    out.done = True
    for key, name in (("in_a_top1", "imagenet_a"), ("in_r_top1", "imagenet_r"), ("in_sketch_top1", "imagenet_sketch")):
        if name in r:
            out.cells[key] = cell(r[name]["top1"], r[name]["n"], f"{r[name]['classes']} classes")
    c = r.get("imagenet_c")
    if c:
        note = f"{c['mCE_status']}; normalised by AlexNet's errors; {c['classes']} classes"
        out.cells["in_c_mce"] = cell(c["mCE"], c["images"], note)
        out.figures = {name: sum(e.values()) / len(e) for name, e in c["error"].items()}
    for key, problem in r.get("problems", {}).items():
        out.progress += f"; {key}: {problem}"
    return out


def read_pictures(d: Path, job: Job) -> Outcome:
    """The feature pictures (tools/visualize.py): the last block's attention and the PCA of the patch tokens."""
    files = {kind: d / f"{kind}.png" for kind in PICTURES}
    done = all(f.is_file() for f in files.values())
    return Outcome(done=done, progress="drawn" if done else "",
                   result={kind: str(f) for kind, f in files.items() if f.is_file()})


PICTURES = ("attention", "pca")
READERS = {"export": read_export, "cost": read_cost, "pictures": read_pictures, "knn": read_knn,
           "linprobe": read_classifier, "finetune": read_classifier, "detection": read_detection,
           "robustness": read_robustness}
