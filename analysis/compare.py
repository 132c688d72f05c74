"""MAE vs RC-MAE (same and different teacher mask) at equal steps, over several seeds.

Each (variant, seed) is an ordinary pretraining run (``python -m rcmae.tools.pretrain`` with the
comparison's pretraining config, the variant's overrides and ``train.seed``), so the variants see the
same images in the same order with the same masks (data order and masks are functions of (seed, step)),
and a run that is already complete is only resumed, not redone. Then, from each run's files:

- held-out reconstruction loss of every kept checkpoint, on fixed images with fixed masks (student; the
  teacher too where there is one);
- k-NN top-1 (the run's ``knn`` monitor), the training reconstruction loss and the gradient probe's
  records (``analysis.every_steps``, RC-MAE runs) from ``metrics.jsonl``;
- the median step time and the peak memory (each run is its own process, so the peak is its own).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from rcmae.core.checkpoint import list_checkpoints, read_checkpoint
from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.demo import build_demo_labelled
from rcmae.core.data.folder import list_images
from rcmae.core.data.transforms import eval_transform
from rcmae.core.errors import ConfigError
from rcmae.core.plotting import plt, save_figure
from rcmae.pretrain.models import random_masking_ids
from rcmae.pretrain.rcmae import mask_noise, rcmae_from_checkpoint

log = logging.getLogger(__name__)

VARIANTS = {  # overrides on top of the comparison's pretraining config
    "mae": ["rcmae.gamma=0", "export.which=student", "analysis.every_steps=0"],
    "rcmae_same": ["rcmae.teacher_mask=same"],
    "rcmae_different": ["rcmae.teacher_mask=different"],
}
SUMMARY_KEYS = ("heldout_recon", "teacher_heldout_recon", "knn_top1", "train_recon", "step_s", "mem_gb")


def run_dir(out_dir: Path, variant: str, seed: int) -> Path:
    return out_dir / "runs" / f"{variant}_seed{seed}"


def pretrain_command(c: dict, variant: str, seed: int, out: Path, device: str) -> list[str]:
    """The command line of one run (``compare.launcher`` in front, e.g. ``torchrun --nproc-per-node 8``)."""
    probe = [f"analysis.every_steps={c['probe_every_steps']}"] if variant != "mae" else []
    launcher = c["launcher"] or [sys.executable]
    return [*launcher, "-m", "rcmae.tools.pretrain", "--config-file", c["pretrain_config"], *c["pretrain_overrides"],
            *probe, *VARIANTS[variant], f"train.seed={seed}", f"train.output_dir={out}", f"train.device={device}"]


def train_runs(c: dict, out_dir: Path, device: str) -> list[dict]:
    """Run (or resume, or find complete) every (variant, seed); the console output of each goes to
    ``console.txt`` in its directory."""
    runs = [{"variant": v, "seed": s, "dir": run_dir(out_dir, v, s)} for v in c["variants"] for s in c["seeds"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, r in enumerate(runs, 1):
        r["dir"].mkdir(parents=True, exist_ok=True)
        cmd = pretrain_command(c, r["variant"], r["seed"], r["dir"], device)
        log.info("[%d/%d] %s seed %d: %s", k, len(runs), r["variant"], r["seed"], " ".join(cmd))
        with open(r["dir"] / "console.txt", "a") as console:
            done = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            tail = (r["dir"] / "console.txt").read_text().splitlines()[-15:]
            raise RuntimeError(f"the {r['variant']} seed {r['seed']} run failed ({' '.join(cmd)}):\n" + "\n".join(tail))
    return runs


def heldout_batch(path: str | Path, n: int, img_size: int) -> torch.Tensor:
    """``n`` images spread evenly over a folder's sorted list, resized and centre-cropped (no randomness)."""
    paths = list_images(path, "the held-out folder")
    n = min(n, len(paths))
    images = SeededImages([paths[i * len(paths) // n] for i in range(n)], eval_transform(img_size, None))
    return torch.stack([images[(i, 0)][0] for i in range(n)])


@torch.no_grad()
def heldout_recon(checkpoint: Path, imgs: torch.Tensor, seed: int) -> dict:
    """Reconstruction loss of the student (and teacher) of a checkpoint on ``imgs`` with fixed masks."""
    model = rcmae_from_checkpoint(read_checkpoint(checkpoint)).to(imgs.device).eval()
    noise = mask_noise(seed, 0, len(imgs), model.student.num_patches, imgs.device, False)
    ids_keep, ids_restore, mask = random_masking_ids(noise, model.mask_ratio)
    out = {}
    for name, net in (("heldout_recon", model.student), ("teacher_heldout_recon", model.teacher)):
        if net is not None:
            out[name] = float(net.reconstruction_loss(net(imgs, ids_keep, ids_restore), imgs, mask))
    return out


def read_metrics(path: Path) -> list[dict]:
    """The run's ``metrics.jsonl``; a resumed run logs some steps again: the last record of a
    step and kind wins."""
    by_key = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        kind = "knn" if "knn_top1" in r else "probe" if "probe_cos_r_c" in r else "train"
        by_key[(kind, r["step"])] = r
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def evaluate_run(r: dict, imgs: torch.Tensor, heldout_seed: int) -> dict:
    """Curves and final numbers of one run (see the module docstring)."""
    records = read_metrics(r["dir"] / "metrics.jsonl")
    train = [x for x in records if "recon" in x]
    curves = {"train_recon": [(x["step"], x["recon"]) for x in train],
              "knn_top1": [(x["step"], x["knn_top1"]) for x in records if "knn_top1" in x]}
    for key in ("cos_r_c", "ratio_c_r", "cos_c_update"):
        curves[f"probe_{key}"] = [(x["step"], x[f"probe_{key}"]) for x in records if f"probe_{key}" in x]
    checkpoints = list_checkpoints(r["dir"])
    if not checkpoints:
        raise ConfigError(f"{r['dir']} holds no checkpoint: the run did not save one")
    by_step = [(int(p.stem.split("_")[1]), heldout_recon(p, imgs, heldout_seed)) for p in checkpoints]
    for key in ("heldout_recon", "teacher_heldout_recon"):
        curves[key] = [(step, v[key]) for step, v in by_step if key in v]
    timed = [x["step_s"] for x in train[1:]] or [x["step_s"] for x in train]  # the first window warms up
    final = {"step": by_step[-1][0], **by_step[-1][1],
             "knn_top1": curves["knn_top1"][-1][1] if curves["knn_top1"] else None,
             "train_recon": train[-1]["recon"], "step_s": statistics.median(timed),
             "mem_gb": max(x["mem_gb"] for x in train)}
    return {"variant": r["variant"], "seed": r["seed"], "dir": str(r["dir"]), "final": final, "curves": curves}


def summarize(results: list[dict], variants: list[str]) -> dict:
    """Mean and standard deviation over seeds of each final number, per variant."""
    out = {}
    for v in variants:
        finals = [r["final"] for r in results if r["variant"] == v]
        out[v] = {"seeds": len(finals)}
        for key in SUMMARY_KEYS:
            values = [f[key] for f in finals if f.get(key) is not None]
            if values:
                out[v][key] = {"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def mean_curve(results: list[dict], variant: str, key: str):
    """Steps, mean and std over seeds of a curve (at the steps every seed has)."""
    curves = [dict(r["curves"][key]) for r in results if r["variant"] == variant and r["curves"][key]]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [statistics.pstdev(v) for v in values]


def plot_curves(results: list[dict], variants: list[str], keys: list[tuple[str, str]], path: Path, title: str) -> Path:

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for v in variants:
            steps, mean, std = mean_curve(results, v, key)
            if steps:
                ax.plot(steps, mean, marker="." if len(steps) < 30 else None, label=v)
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def write_csvs(results: list[dict], summary: dict, out_dir: Path) -> dict:
    import csv

    paths = {"runs": out_dir / "compare_runs.csv", "summary": out_dir / "compare_summary.csv",
             "curves": out_dir / "compare_curves.csv"}
    with open(paths["runs"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "step", *SUMMARY_KEYS])
        for r in results:
            w.writerow([r["variant"], r["seed"], r["final"]["step"], *(r["final"].get(k) for k in SUMMARY_KEYS)])
    with open(paths["summary"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seeds", *(f"{k}_{s}" for k in SUMMARY_KEYS for s in ("mean", "std"))])
        for v, s in summary.items():
            w.writerow([v, s["seeds"], *(s.get(k, {}).get(stat) for k in SUMMARY_KEYS for stat in ("mean", "std"))])
    with open(paths["curves"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "curve", "step", "value"])
        for r in results:
            for key, points in r["curves"].items():
                w.writerows([r["variant"], r["seed"], key, step, value] for step, value in points)
    return {k: str(p) for k, p in paths.items()}


def compare(c: dict, out_dir: Path, device: torch.device, img_size: int, heldout_path: str | None) -> dict:
    """Train / resume every run, evaluate on ``heldout_path`` (an image folder; None: the demo's),
    and write the CSVs and figures; returns every number."""
    runs = train_runs(c, out_dir, device.type)
    heldout = heldout_path or build_demo_labelled(  # the demo: other crops of four of the pretraining photos
        out_dir / "heldout_demo", train_per_class=1, val_per_class=16, seed=7) / "val"
    imgs = heldout_batch(heldout, c["heldout_images"], img_size).to(device)
    results = [evaluate_run(r, imgs, c["heldout_seed"]) for r in runs]
    summary = summarize(results, c["variants"])
    figures = {
        "curves": str(plot_curves(results, c["variants"], [
            ("train_recon", "training reconstruction loss"), ("heldout_recon", "held-out reconstruction (fixed masks)"),
            ("knn_top1", "k-NN top-1 (%)")], out_dir / "compare_curves.png",
            f"MAE vs RC-MAE, mean +- std over seeds {c['seeds']}")),
        "probe": str(plot_curves(results, [v for v in c["variants"] if v != "mae"], [
            ("probe_cos_r_c", "cos(grad L_r, grad L_c)"), ("probe_cos_c_update", "cos(-grad L_c, last update)"),
            ("probe_ratio_c_r", "|grad L_c| / |grad L_r|")], out_dir / "probe_curves.png",
            "gradient probe during training: same vs different teacher mask")),
    }
    return {"heldout": {"path": str(heldout), "images": len(imgs), "mask_seed": c["heldout_seed"]},
            "summary": summary, "runs": results, "csv": write_csvs(results, summary, out_dir), "figures": figures}
