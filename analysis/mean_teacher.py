"""``tools/analyze_teacher.py``: the paper's analysis of the mean teacher, measured, in three sections.

1. ``linear``: the linear model exactly (``linear_teacher.py``): closed form vs autograd, and the
   consistency gradient against the similarity of consecutive inputs.
2. ``probe``: a real RC-MAE checkpoint (``probe.checkpoint``, or the comparison's first RC-MAE run):
   the gradients of L_r and L_c at the checkpoint, and the controlled experiment (one SGD step on a
   batch B1 from teacher = student, then grad L_c on B1 with the same masks, new masks, new
   augmentations, and on images of another class).
3. ``compare``: MAE vs RC-MAE same / different mask over seeds (``compare.py``), with the gradient
   probe logged during the RC-MAE runs.

Everything lands in ``train.output_dir``: ``analysis.json`` (every number), CSVs and PNG figures.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import random
import statistics
from pathlib import Path

import torch

from rcmae.analysis.compare import VARIANTS, compare, run_dir
from rcmae.analysis.linear_teacher import run_linear_analysis
from rcmae.core.checkpoint import find_last_checkpoint, read_checkpoint
from rcmae.core.config import load_config
from rcmae.core.data.datasets import SeededImages
from rcmae.core.data.folder import image_folder_classes
from rcmae.core.data.pipelines import pretrain_transform
from rcmae.core.data.readers import labelled_images
from rcmae.core.data.transforms import to_model_input
from rcmae.core.errors import ConfigError
from rcmae.core.plotting import plt, save_figure
from rcmae.core.run import start_run
from rcmae.pretrain.defaults import DEFAULTS as PRETRAIN_DEFAULTS
from rcmae.pretrain.probe import STATS, gradient_stats, loss_gradients, student_params
from rcmae.pretrain.rcmae import RCMAE, mask_noise, rcmae_from_checkpoint
from rcmae.pretrain.train import validate as validate_pretrain

log = logging.getLogger(__name__)

SECTIONS = ("linear", "probe", "compare")
CASES = ("same_masks", "new_masks", "new_augmentation", "unrelated")


def comparison(cfg: dict) -> dict:
    """The ``compare`` section with ``data.train_path`` / ``data.val_path`` turned into pretraining
    overrides (pretraining data and the k-NN monitor; the user's own overrides come after)."""
    d, c = cfg["data"], cfg["compare"]
    overrides = ["data.source=folder", f"data.path={d['train_path']}"] if d["train_path"] else []
    if d["train_path"] and d["val_path"]:
        overrides += ["knn.source=folder", f"knn.train_path={d['train_path']}", f"knn.val_path={d['val_path']}"]
    return {**c, "pretrain_overrides": [*overrides, *c["pretrain_overrides"]]}


def pretrain_config(cfg: dict, variant: str) -> dict:
    """The pretraining config of a comparison run (for checks; the run itself reads the same)."""
    c = comparison(cfg)
    return load_config(PRETRAIN_DEFAULTS, c["pretrain_config"], [*c["pretrain_overrides"], *VARIANTS[variant]])


def validate(cfg: dict, world: int = 1) -> None:
    """Every section's settings, and each comparison run's pretraining config, before any work."""
    unknown = [s for s in cfg["sections"] if s not in SECTIONS]
    if unknown or not cfg["sections"]:
        raise ConfigError(f"sections must be a non-empty list of {SECTIONS}, got {cfg['sections']}")
    if "compare" in cfg["sections"]:
        unknown = [v for v in cfg["compare"]["variants"] if v not in VARIANTS]
        if unknown or not cfg["compare"]["seeds"]:
            raise ConfigError(f"compare.variants must be among {list(VARIANTS)} (got {unknown}); "
                              "compare.seeds must not be empty")
        for variant in cfg["compare"]["variants"]:
            validate_pretrain(pretrain_config(cfg, variant), world)
    p = cfg["probe"]
    if "probe" in cfg["sections"]:
        compared = "compare" in cfg["sections"] and "rcmae_same" in cfg["compare"]["variants"]
        if p["checkpoint"] is None and not compared:
            raise ConfigError("the probe needs probe.checkpoint, or the compare section with its rcmae_same runs")
        if p["checkpoint"] is not None and not Path(p["checkpoint"]).is_file():
            raise FileNotFoundError(f"probe.checkpoint: {p['checkpoint']} does not exist")
        if p["checkpoint"] is not None and not (p["data_path"] or cfg["data"]["train_path"]):
            raise ConfigError("probe.checkpoint needs images: probe.data_path (or data.train_path), "
                              "an ImageFolder tree")
        for key, path in (("probe.data_path", p["data_path"]), ("data.train_path", cfg["data"]["train_path"]),
                          ("data.val_path", cfg["data"]["val_path"])):
            if path is not None:
                image_folder_classes(path, key)


class ProbeImages:
    """The probe's images, by class folder (listed once)."""

    def __init__(self, data_path: str | Path, img_size: int, crop_min_scale: float):
        paths, labels, _ = labelled_images(data_path, "folder", "probe.data_path")
        self.images = SeededImages(paths, pretrain_transform(img_size, crop_min_scale))
        self.by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(i)
        if len(self.by_class) < 2:
            raise ConfigError(f"{data_path}: the probe needs two class folders at least (B1 and unrelated images)")

    def trial(self, p: dict, num_patches: int, trial: int):
        """B1 (images of one class folder), B1 with other augmentations, images of another class
        folder, and two masks; a function of (probe.seed, trial)."""
        rng = random.Random(p["seed"] * 1000 + trial)
        first, other = rng.sample(sorted(self.by_class), 2)
        b1, unrelated = ([rng.choice(self.by_class[c]) for _ in range(p["batch_size"])] for c in (first, other))
        stack = lambda idx, seed: to_model_input(  # noqa: E731
            torch.stack([self.images[(i, seed)][0] for i in idx]), torch.device("cpu"))
        masks = mask_noise(p["seed"], trial, 2 * p["batch_size"], num_patches, torch.device("cpu"), False)
        return stack(b1, trial), stack(b1, trial + 10_000), stack(unrelated, trial), *masks.chunk(2)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def probe_checkpoint(p: dict, checkpoint: Path, data_path: str, device: torch.device, out_dir: Path) -> dict:
    """Section 2 on one checkpoint, over ``probe.trials`` batches; writes ``probe_*.csv`` / ``.png``."""
    model = rcmae_from_checkpoint(read_checkpoint(checkpoint))
    if model.teacher is None:  # MAE: the experiment starts from teacher = student anyway
        model = RCMAE(model.student, model.mask_ratio, gamma=1.0)
    model = model.to(device).eval()
    img_size, num_patches = model.student.patch_embed.img_size[0], model.student.num_patches
    images = ProbeImages(data_path, img_size, p["crop_min_scale"])
    at_checkpoint, experiment = [], {case: [] for case in CASES}
    for trial in range(p["trials"]):
        b1, b1_aug, unrelated, n1, n2 = [t.to(device) for t in images.trial(p, num_patches, trial)]
        at_checkpoint.append(gradient_stats(*loss_gradients(model, b1, n1)))
        cases = {"same_masks": (b1, n1), "new_masks": (b1, n2), "new_augmentation": (b1_aug, n2),
                 "unrelated": (unrelated, n2)}
        for case, stats in update_experiment(model, cases, (b1, n1), p["lr"], p["momentum"]).items():
            experiment[case].append(stats)
    result = {
        "checkpoint": str(checkpoint), "data_path": str(data_path), "trials": p["trials"],
        "at_checkpoint": {k: mean_std([s[k] for s in at_checkpoint]) for k in ("cos_r_c", "ratio_c_r")},
        "blocks": {b: {k: mean_std([s["blocks"][b][k] for s in at_checkpoint]) for k in ("cos_r_c", "ratio_c_r")}
                   for b in at_checkpoint[0]["blocks"]},
        "experiment": {case: {k: mean_std([s[k] for s in runs]) for k in STATS} for case, runs in experiment.items()},
    }
    with open(out_dir / "probe_experiment.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", *(f"{k}_{s}" for k in STATS for s in ("mean", "std"))])
        for case, stats in result["experiment"].items():
            w.writerow([case, *(stats[k][s] for k in STATS for s in ("mean", "std"))])
    with open(out_dir / "probe_blocks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "cos_r_c_mean", "cos_r_c_std", "ratio_c_r_mean", "ratio_c_r_std"])
        for block, stats in result["blocks"].items():
            w.writerow([block, *(stats[k][s] for k in ("cos_r_c", "ratio_c_r") for s in ("mean", "std"))])
    result["figure"] = str(plot_probe(result, out_dir / "probe_experiment.png"))
    return result


def plot_probe(result: dict, path: Path) -> Path:

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    exp = result["experiment"]
    for ax, key, title in ((left, "cos_c_update", "cos(-grad L_c, last update)"),
                           (middle, "ratio_c_r", "|grad L_c| / |grad L_r|")):
        ax.bar(range(len(exp)), [exp[c][key]["mean"] for c in exp], yerr=[exp[c][key]["std"] for c in exp], capsize=3)
        ax.set_xticks(range(len(exp)), [c.replace("_", "\n") for c in exp], fontsize=8)
        ax.set_title(f"after one step on B1: {title}", fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    blocks = list(result["blocks"])
    right.plot(range(len(blocks)), [result["blocks"][b]["cos_r_c"]["mean"] for b in blocks], marker="o")
    right.set_xticks(range(len(blocks)), blocks, rotation=70, fontsize=7)
    right.set_title("at the checkpoint: cos(grad L_r, grad L_c) per block", fontsize=9)
    right.axhline(0, color="k", lw=0.5)
    return save_figure(fig, path, dpi=110)


def main(cfg: dict) -> dict:
    run = start_run(cfg, validate)  # checked before the output directory is touched
    out_dir, results = run.out_dir, {"config": cfg}
    if "linear" in cfg["sections"]:
        log.info("section 1: the linear model")
        results["linear"] = run_linear_analysis(out_dir, cfg["linear"]["seed"])
    if "compare" in cfg["sections"]:
        log.info("section 3: MAE vs RC-MAE (%s, seeds %s)", cfg["compare"]["variants"], cfg["compare"]["seeds"])
        img_size = pretrain_config(cfg, cfg["compare"]["variants"][0])["model"]["img_size"]
        results["compare"] = compare(comparison(cfg), out_dir, run.device, img_size, cfg["data"]["val_path"])
    if "probe" in cfg["sections"]:
        p = cfg["probe"]
        source = run_dir(out_dir, "rcmae_same", cfg["compare"]["seeds"][0]) if p["checkpoint"] is None else None
        checkpoint = Path(p["checkpoint"]) if source is None else find_last_checkpoint(source)
        data_path = p["data_path"] or cfg["data"]["train_path"] or source / "demo_data"
        log.info("section 2: gradient probe of %s on %s", checkpoint, data_path)
        results["probe"] = probe_checkpoint(p, checkpoint, data_path, run.device, out_dir)
    path = out_dir / "analysis.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    log.info("every number: %s", path)
    return {"output_dir": str(out_dir), "analysis": str(path),
            "figures": ", ".join(str(p) for p in sorted(out_dir.glob("*.png")))}


def update_experiment(model: RCMAE, cases: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      first: tuple[torch.Tensor, torch.Tensor], lr: float, momentum: float) -> dict:
    """From teacher = student: one SGD step (``lr``) on ``first`` = (images, noise), the EMA update
    (``momentum``), then :func:`gradient_stats` of every case (name -> (images, noise)) against that
    update. ``model`` is left unchanged (the experiment runs on a copy)."""
    m = copy.deepcopy(model)
    if m.teacher is None:
        raise ValueError("update_experiment needs RC-MAE (a teacher)")
    m.teacher.load_state_dict(m.student.state_dict())
    params = student_params(m)
    before = {n: p.detach().clone() for n, p in params.items()}
    g_r, _ = loss_gradients(m, *first)  # at teacher = student, L_c and its gradient are zero
    with torch.no_grad():
        for n, p in params.items():
            p -= lr * g_r[n]
    m.update_teacher(momentum)
    update = {n: p.detach() - before[n] for n, p in params.items()}
    return {name: gradient_stats(*loss_gradients(m, imgs, noise), update) for name, (imgs, noise) in cases.items()}
