"""Checks of a detection run made before anything starts here (one process, detectron2's launch,
torchrun) or is submitted (``--slurm``), and the plan ``--dry-run`` prints once they pass: the config
and its overrides, the datasets, the initial weights, the batch layout and the output directory. A
typo fails in seconds instead of after the queue wait, and every problem found is reported at once."""
from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from rcmae.core.config import config_path
from rcmae.core.errors import ConfigError
from rcmae.detection.data import DatasetError, validate_coco_json

NEW_KEY_SECTIONS = ("datasets.",)  # overrides may add entries here; elsewhere a new key is a typo
DEMO_DATA = "{demo}"  # stands for the coins set the run builds in its output directory
_ABSENT = object()


def load_config(config_file: str, overrides: list[str]):
    """A LazyConfig file (a path, or a shipped config's name from any directory:
    ``configs/detection/demo_tiny.py``, ``detection/demo_tiny``) with ``key=value`` overrides applied;
    an override must name a key the config has (new keys only under ``datasets``), so a misspelt key
    is an error, not a silently added one."""
    path = config_path(config_file)
    try:
        cfg = LazyConfig.load(str(path))
    except Exception as e:  # noqa: BLE001 - any error of a user's Python config, reported by name
        raise ConfigError(f"cannot load config {path}: {type(e).__name__}: {e}") from None
    problems = [unknown_override(cfg, item) for item in overrides]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    try:
        return LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # noqa: BLE001 - hydra's parser and OmegaConf raise various types
        raise ConfigError(f"{path}: cannot apply overrides {overrides}: {e}") from None


def unknown_override(cfg, item: str) -> str | None:
    """What is wrong with one ``key=value`` override, if anything (with the closest existing key)."""
    if "=" not in item:
        hint = " (options such as --dataset go before the key=value overrides)" if item.startswith("--") else ""
        return f"override {item!r} is not key=value{hint}"
    key = item.split("=", 1)[0]
    if key.startswith(NEW_KEY_SECTIONS) or OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
        return None
    parent, _, leaf = key.rpartition(".")
    siblings = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    close = difflib.get_close_matches(leaf, list(siblings.keys()), n=1) if isinstance(siblings, DictConfig) else []
    hint = f" (did you mean {'.'.join(filter(None, (parent, close[0])))}?)" if close else ""
    return f"override {item}: the config has no key {key}{hint}"


def unknown_arguments(node, where: str = "") -> list[str]:
    """Keys of ``LazyCall`` nodes that their target does not accept (``model.backbone.net.embed_dims``
    for ``ViT``), found without building anything."""
    problems = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            target = locate(node._target_) if isinstance(node._target_, str) else node._target_
            params = inspect.signature(target).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                name = getattr(target, "__qualname__", str(target))
                problems += [f"{where}.{k}: not an argument of {name}" for k in node
                             if k != "_target_" and k not in params]
        for key, value in node.items():
            problems += unknown_arguments(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            problems += unknown_arguments(value, f"{where}[{i}]")
    return problems


def path_datasets(cfg, extra=()) -> dict[str, tuple[str, str]]:
    """``{name: (json_file, image_root)}`` of the datasets registered by path: the config's
    ``datasets`` dict, then ``--dataset NAME JSON ROOT``."""
    found = {name: (d["json_file"], d["image_root"]) for name, d in cfg.get("datasets", {}).items()}
    found.update({name: (json_file, image_root) for name, json_file, image_root in extra})
    return found


def used_datasets(cfg, eval_only: bool) -> list[tuple[str, str]]:
    """``(config key, dataset name)`` of every dataset the run reads."""
    keys = ["dataloader.test.dataset.names"] if eval_only else ["dataloader.train.dataset.names",
                                                                 "dataloader.test.dataset.names"]
    used = []
    for key in keys:
        names = OmegaConf.select(cfg, key)
        used += [(key, name) for name in ([names] if isinstance(names, str) else names)]
    return used


def dataset_problems(cfg, eval_only: bool, extra=()) -> list[str]:
    by_path = path_datasets(cfg, extra)
    problems, seen = [], set()
    for key, name in used_datasets(cfg, eval_only):
        if name in seen:
            continue
        seen.add(name)
        if name in by_path:
            json_file, image_root = by_path[name]
            if DEMO_DATA in json_file or DEMO_DATA in image_root:
                continue  # built by the run itself
            try:
                validate_coco_json(json_file, image_root)
            except DatasetError as e:
                problems.append(f"dataset {name}: {e}")
        elif name in DatasetCatalog.list():  # a detectron2 builtin (coco_2017_train, ...)
            meta = MetadataCatalog.get(name)
            for what, path in (("annotation file", meta.get("json_file")), ("image root", meta.get("image_root"))):
                if path and not Path(path).exists():
                    problems.append(f"dataset {name} (a detectron2 builtin, found under $DETECTRON2_DATASETS, "
                                    f"default ./datasets): {what} {path} does not exist")
        else:
            problems.append(f"dataset {name} ({key}) is not registered: add it to the config's datasets "
                            f"dict or give --dataset {name} JSON IMAGE_ROOT")
    return problems


def resumes(cfg, resume: bool) -> bool:
    """Whether the run continues from the output directory's ``last_checkpoint``."""
    return resume and (Path(cfg.train.output_dir) / "last_checkpoint").is_file()


def weights_problem(cfg, eval_only: bool, resume: bool) -> str | None:
    """What is wrong with the run's starting weights, if anything: an evaluation needs a detector
    checkpoint; training needs backbone weights unless ``train.allow_scratch`` asks for random ones."""
    if resumes(cfg, resume):
        return None
    path = cfg.train.init_checkpoint
    if eval_only:
        if not path:
            return ("--eval-only needs the detector's weights: train.init_checkpoint=PATH (or --resume with "
                    f"a last_checkpoint in train.output_dir={cfg.train.output_dir})")
        if "://" in path:  # detectron2:// or https:// model-zoo files: fetched by the checkpointer
            return None
    elif not path:
        if cfg.train.get("allow_scratch", False):
            return None
        return ("train.init_checkpoint is empty: the backbone would start from random weights. Give the "
                "pretrained weights (train.init_checkpoint=PATH), or train.allow_scratch=True to train from "
                "scratch on purpose")
    if not Path(path).is_file():
        return f"train.init_checkpoint={path} does not exist"
    return None


def check_weights(cfg, eval_only: bool, resume: bool) -> None:
    problem = weights_problem(cfg, eval_only, resume)
    if problem:
        raise ConfigError(problem)


def output_dir_problems(cfg) -> list[str]:
    out = Path(cfg.train.output_dir).resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return [f"train.output_dir={out}: {existing} is not a writable directory"]
    return []


def check_run(cfg, *, eval_only: bool, resume: bool, world_size: int, extra_datasets=()) -> None:
    """Everything about a run that can be checked without building the model or reading images;
    raises one ConfigError listing every problem."""
    problems = [*unknown_arguments(cfg), *dataset_problems(cfg, eval_only, extra_datasets),
                weights_problem(cfg, eval_only, resume), *output_dir_problems(cfg)]
    batch = cfg.dataloader.train.total_batch_size
    if not eval_only and batch % world_size:
        problems.append(f"dataloader.train.total_batch_size={batch} does not divide among {world_size} "
                        f"processes (nodes x GPUs per node): use a multiple of {world_size}")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))


def run_plan(cfg, *, config_file: str, eval_only: bool, resume: bool, world_size: int, extra_datasets=()) -> str:
    """What a run of ``cfg`` would do (``--dry-run``): config, processes, model, data, weights, outputs."""
    out = Path(cfg.train.output_dir).resolve()
    target = cfg.model._target_
    net = OmegaConf.select(cfg, "model.backbone.net") or OmegaConf.select(cfg, "model.backbone.bottom_up.net")
    batch = cfg.dataloader.train.total_batch_size
    if eval_only:
        what = "evaluation"
    else:
        what = (f"training, {cfg.train.max_iter} iterations at batch {batch} ({batch // world_size} per process), "
                f"lr {cfg.optimizer.lr}, AMP {'on' if cfg.train.amp.enabled else 'off'}")
    lines = [f"config:     {config_file}",
             f"run:        {what}{', resuming from ' + str(out / 'last_checkpoint') if resumes(cfg, resume) else ''}",
             f"processes:  {world_size}, device {cfg.train.device}",
             f"model:      {getattr(target, '__name__', target)}"
             + (f", ViT {net.embed_dim} wide, {net.depth} blocks, {net.img_size} px" if net is not None else "")]
    by_path, seen = path_datasets(cfg, extra_datasets), set()
    for key, name in used_datasets(cfg, eval_only):
        if name not in seen:
            seen.add(name)
            json_file, image_root = by_path[name] if name in by_path else (  # a detectron2 builtin
                MetadataCatalog.get(name).get("json_file", "?"), MetadataCatalog.get(name).get("image_root", "?"))
            source = (f"built by the run in {out / 'demo_data'}" if DEMO_DATA in json_file
                      else f"{json_file}, images in {image_root}")
            lines.append(f"dataset:    {name} ({key}): {source}")
    lines += [f"weights:    {cfg.train.init_checkpoint or 'none, a random backbone (train.allow_scratch)'}"
              f"{' (the detector to evaluate)' if eval_only else ''}",
              f"output dir: {out}"]
    return "\n".join(lines)
