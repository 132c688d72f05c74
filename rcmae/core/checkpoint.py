"""Checkpoints: atomic writes with a ``last_checkpoint`` pointer and retention, readers for our own,
the official MAE / RC-MAE and timm formats, strict-by-default state loading with a report, encoder export.

Every training checkpoint of ours (pretraining and fine-tuning, written by :class:`Checkpointer`) holds
the training state::

    {"optimizer", "optimizer_param_names", "scaler", "step", "epoch", "step_in_epoch",
     "rng" (one entry per rank), "config"}

plus what its trainer describes. Pretraining (``format = "rcmae-toolkit/1"``): ``"arch"``, ``"student"``,
``"teacher"`` (None for MAE), MaskedAutoencoderViT state dicts (MAE key names, no ``module.``).
Fine-tuning (``format = "rcmae-toolkit/classifier/1"``): ``"arch"``, ``"img_size"``, ``"global_pool"``,
``"num_classes"``, ``"mode"``, ``"model"`` (timm key names, a probe's BatchNorm folded into the head),
``"train_model"`` (the module as trained), ``"best"``, ``"eval"``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rcmae.core.config import flatten
from rcmae.core.data.transforms import mae_eval_config
from rcmae.core.distributed import all_gather_objects
from rcmae.core.errors import CheckpointError, ConfigError
from rcmae.core.vit import ARCHS, infer_arch, is_encoder_key

log = logging.getLogger(__name__)

FORMAT = "rcmae-toolkit/1"
CLASSIFIER_FORMAT = "rcmae-toolkit/classifier/1"
PROBE_GRID_FORMAT = "rcmae-toolkit/probe-grid/1"  # a linear-probe grid's training state (finetune/probe_grid.py)
POINTER = "last_checkpoint"
FIXED_KEYS = ("pos_embed", "decoder_pos_embed")  # fixed sin-cos: recomputed, never learned


# ----------------------------------------------------------------------------- writing
def tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nested state: about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units: ``4.0 kB``, ``12.3 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def atomic_write(path: Path, write, size: int) -> None:
    """``write(tmp)``, fsync, then rename onto ``path``: readers see the old file or the new one, never
    half of one. A failed or interrupted write takes its temporary file with it; a full disk is a
    :class:`CheckpointError` naming the file, the space free and the ``size`` it needed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(f"no space left on the device while writing {path}: {human_bytes(free)} free there, "
                                  f"the file needs about {human_bytes(size)}. Free some space (older checkpoints "
                                  "are deleted only after a new one is written), then resume.") from None
        raise


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), tensor_bytes(obj))


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep: int) -> Path:
    """Write ``checkpoint_<step>.pth`` atomically, point ``last_checkpoint`` at it, keep the last K."""
    out_dir = Path(out_dir)
    path = out_dir / f"checkpoint_{step:08d}.pth"
    atomic_save(state, path)
    atomic_write(out_dir / POINTER, lambda tmp: tmp.write_text(path.name + "\n"), len(path.name) + 1)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("checkpoint_*.pth")
                  if re.fullmatch(r"checkpoint_\d+\.pth", p.name))


def resume_path(resume, out_dir: str | Path) -> Path | None:
    """``train.resume``: ``auto`` (the output dir's last checkpoint, if any), ``none``, or a file."""
    if resume == "auto":
        return find_last_checkpoint(out_dir)
    return None if resume in (None, "none", False) else Path(resume)


WHICH = ("auto", "teacher", "student")  # the model of a pretraining checkpoint to use (auto: teacher if any)


def check_which(key: str, value: str) -> None:
    """A config value choosing a pretraining checkpoint's model (``init.which``) is one of :data:`WHICH`."""
    if value not in WHICH:
        raise ConfigError(f"{key} must be one of {WHICH}, got {value!r}")


def check_checkpoint_option(key: str, value) -> None:
    """A config value naming a checkpoint file (``auto`` / ``none`` / unset pass) must exist."""
    if value not in (None, "auto", "none", False) and not Path(value).is_file():
        raise FileNotFoundError(f"{key}: checkpoint {value} does not exist")


def find_last_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / POINTER
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


# ----------------------------------------------------------------------------- training state
def rng_state() -> dict:
    """RNG states in plain types, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                      float(gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def warn_config_changes(saved: dict, cfg: dict) -> None:
    """Resuming with another recipe is allowed (e.g. more epochs) but never silent."""
    old, new = flatten(saved), flatten(cfg)
    changed = {k: (old.get(k), new[k]) for k in new
               if old.get(k) != new[k] and not k.startswith(("train.", "log.", "checkpoint."))}
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's: %s",
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


class Checkpointer:
    """Saves and restores the training state every trainer shares (module header): the optimizer by
    parameter name, the loss scaler, the step, every rank's RNG and the config, next to the
    trainer's own ``payload`` (models, format, ...). Atomic, with a pointer and retention."""

    def __init__(self, out_dir: Path, keep: int, optimizer, param_names: list[str], scaler, cfg: dict,
                 steps_per_epoch: int, rank: int):
        self.out_dir, self.keep, self.cfg, self.rank = Path(out_dir), keep, cfg, rank
        self.optimizer, self.param_names, self.scaler = optimizer, param_names, scaler
        self.steps_per_epoch = steps_per_epoch

    def save(self, step: int, **payload) -> Path | None:
        """All ranks call it (their RNG states are gathered); rank 0 writes, and a failed write (a full
        disk) stops every rank with its error rather than leaving them waiting."""
        state = {**payload, "optimizer": self.optimizer.state_dict(), "optimizer_param_names": self.param_names,
                 "scaler": self.scaler.state_dict() if self.scaler else None, "step": step,
                 "epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
                 "rng": all_gather_objects(rng_state()), "config": self.cfg}
        path = failure = None
        if self.rank == 0:
            try:
                path = save_checkpoint(state, self.out_dir, step, self.keep)
            except CheckpointError as e:
                failure = e
        failure = all_gather_objects(failure)[0]
        if failure is not None:
            raise failure
        if path is not None:
            log.info("saved %s", path)
        return path

    def restore_optimizer(self, state: dict, saved_names: list[str]) -> None:
        """By parameter name: the grouping may differ from the saved one (official order, another
        ``optim.decay_tokens``), and a mismatch is an error rather than misaligned moments."""
        self.optimizer.load_state_dict(remap_optimizer_state(
            state["optimizer"], saved_names, self.param_names, self.optimizer.state_dict()))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def restore(self, state: dict, path: Path) -> int:
        """Everything but the models from one of our checkpoints; returns the step to continue at."""
        warn_config_changes(state["config"], self.cfg)
        if "optimizer_param_names" not in state:  # saved before the names were recorded
            raise CheckpointError(f"{path} predates parameter-named optimizer states; finish that run "
                                  "with the version that started it, or start anew")
        self.restore_optimizer(state, state["optimizer_param_names"])
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        log.info("resumed from %s at step %d (epoch %.2f)", path, state["step"],
                 state["step"] / self.steps_per_epoch)
        return state["step"]


# ----------------------------------------------------------------------------- reading
@dataclass
class PretrainCheckpoint:
    """A pretraining checkpoint of any supported origin, keys normalised to our names."""
    path: str
    source: str  # "ours" | "ours-classifier" | "mae" | "rcmae" | "timm"
    student: dict
    teacher: dict | None
    raw: dict = field(repr=False)

    @property
    def optimizer(self):
        return self.raw.get("optimizer")

    def model(self, which: str) -> tuple[str, dict]:
        """The weights to export or fine-tune: ``teacher``, ``student``, or ``auto`` (teacher if any)."""
        if which == "auto":
            which = "teacher" if self.teacher is not None else "student"
        if which == "teacher":
            if self.teacher is None:
                raise CheckpointError(f"{self.path} ({self.source}) has no teacher; "
                                      "use which=student (or auto)")
            return which, self.teacher
        if which == "student":
            return which, self.student
        raise ValueError(f"which must be teacher, student or auto, got {which!r}")


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def torch_load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Official MAE / RC-MAE checkpoints pickle their argparse Namespace.
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def read_checkpoint(path: str | Path) -> PretrainCheckpoint:
    raw = torch_load(path)
    if raw.get("format") == FORMAT:
        return PretrainCheckpoint(str(path), "ours", raw["student"], raw["teacher"], raw)
    if "student" in raw and "teacher" in raw:
        return PretrainCheckpoint(str(path), "rcmae", strip_prefix(raw["student"]),
                                  strip_prefix(raw["teacher"]), raw)
    if raw.get("format") == CLASSIFIER_FORMAT:
        return PretrainCheckpoint(str(path), "ours-classifier", raw["model"], None, raw)
    if "model" in raw:
        return PretrainCheckpoint(str(path), "mae", strip_prefix(raw["model"]), None, raw)
    if isinstance(raw.get("state_dict"), dict):
        return PretrainCheckpoint(str(path), "timm", strip_prefix(raw["state_dict"]), None, raw)
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):  # a bare state dict (timm)
        return PretrainCheckpoint(str(path), "timm", strip_prefix(raw), None, raw)
    raise CheckpointError(f"{path}: not a ViT checkpoint (expected ours, RC-MAE's 'student'/'teacher', "
                          f"MAE's 'model', timm's 'state_dict' or a bare state dict); "
                          f"top-level keys: {sorted(raw)[:20]}")


@dataclass
class LoadReport:
    """What a strict load did, in one format for every consumer (pretraining, fine-tuning, k-NN,
    detection, robustness, the Python API)."""
    what: str
    loaded: list[str]
    missing: list[str]  # in the model, not in the checkpoint: left at initialisation (allowed ones only)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, deliberately unused
    recomputed: list[str] = field(default_factory=list)  # fixed position embeddings of another size
    source: str = ""  # the checkpoint's origin (see PretrainCheckpoint.source) when it was read from a file
    which: str = ""  # teacher / student, for pretraining checkpoints

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name, keys in (("left at initialisation", self.missing), ("dropped", self.dropped),
                           ("fixed position embeddings of another size, recomputed", self.recomputed)):
            if keys:
                parts.append(f"{name} {len(keys)} ({key_groups(keys)})")
        return "; ".join(parts)


def key_groups(keys: list[str], limit: int = 10) -> str:
    """A few keys as they are; more by their first name (``head.*, norm.*``): what a list is about."""
    groups = keys if len(keys) <= 8 else list(dict.fromkeys(k.split(".")[0] + (".*" if "." in k else "")
                                                            for k in keys))
    return ", ".join(groups[:limit]) + (" ..." if len(groups) > limit else "")


def load_state(module: torch.nn.Module, sd: dict, what: str, may_miss=lambda key: False,
               dropped: list[str] = (), recompute: tuple[str, ...] = (), hint: str = "Check model.arch / "
               "model.img_size / decoder sizes against the checkpoint.", **origin) -> LoadReport:
    """The one strict loader: copy ``sd`` into ``module``. A shape mismatch, an unexpected key or a
    missing key that ``may_miss(key)`` does not allow is a :class:`CheckpointError` naming the keys
    (then ``hint``); nothing is skipped silently. Keys in ``recompute`` (fixed sin-cos position
    embeddings, :data:`FIXED_KEYS`) of another grid size keep the model's recomputed values. ``dropped``
    (keys the caller removed on purpose) and ``origin`` (``source``, ``which``) go into the report,
    which is logged."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    recomputed, bad_shapes, to_load = [], [], {}
    for k, v in sd.items():
        if k not in own:
            continue
        if v.shape != own[k].shape and k in recompute:
            recomputed.append(k)
        elif v.shape != own[k].shape:
            bad_shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            to_load[k] = v
    not_allowed = [k for k in missing if not may_miss(k)]
    if bad_shapes or unexpected or not_allowed:
        raise CheckpointError(
            f"{what} does not fit {type(module).__name__}: "
            + "; ".join(f"{name} {items[:10]}{' ...' if len(items) > 10 else ''}" for name, items in
                        (("shape mismatch", bad_shapes), ("unexpected keys", unexpected),
                         ("missing keys", not_allowed)) if items)
            + f". {hint}")
    module.load_state_dict(to_load, strict=False)
    report = LoadReport(what, sorted(to_load), missing, sorted(dropped), recomputed, **origin)
    log.info("%s: %s", what, report.summary())
    return report


def remap_optimizer_state(opt_sd: dict, saved_names: list[str], names: list[str],
                          template: dict) -> dict:
    """Rebuild an optimizer state dict saved with parameter order ``saved_names`` for the order
    ``names`` of ``template`` (our optimizer's own state dict)."""
    saved_ids = [i for g in opt_sd["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(saved_names) or sorted(saved_names) != sorted(names):
        raise CheckpointError("the checkpoint's optimizer covers other parameters than this model "
                              f"({len(saved_ids)} saved vs {len(names)} here)")
    by_name = {n: opt_sd["state"][i] for n, i in zip(saved_names, saved_ids) if i in opt_sd["state"]}
    ours = [i for g in template["param_groups"] for i in g["params"]]
    state = {i: by_name[n] for n, i in zip(names, ours) if n in by_name}
    return {"state": state, "param_groups": template["param_groups"]}


def timm_model_args(arch: str, img_size: int) -> dict:
    """The VisionTransformer arguments of ``arch`` at ``img_size`` (what a timm folder's config records)."""
    spec = ARCHS[arch]
    return {"img_size": img_size, "patch_size": spec["patch_size"], "embed_dim": spec["embed_dim"],
            "depth": spec["depth"], "num_heads": spec["num_heads"]}


def timm_vit(state_dict: dict, arch: str, img_size: int, what: str, num_classes: int = 0,
             global_pool: str = "token", crop_pct: float | None = None,
             hint: str = "Check the weights against model.arch.") -> torch.nn.Module:
    """timm's VisionTransformer of ``arch`` holding ``state_dict`` (strict: every tensor, nothing else;
    a :class:`CheckpointError` naming the keys otherwise), declaring the preprocessing the weights were
    trained with (ImageNet mean / std, bicubic, MAE's crop), not another tag's."""
    import timm

    data = mae_eval_config(img_size, crop_pct)
    model = timm.create_model(ARCHS[arch]["timm_name"] or "vit_base_patch16_224", pretrained=False,
                              num_classes=num_classes, global_pool=global_pool,
                              pretrained_cfg_overlay={**data, "num_classes": num_classes, "tag": "rcmae_toolkit"},
                              **timm_model_args(arch, img_size))
    load_state(model, state_dict, what, hint=hint)
    return model


def save_timm_folder(model: torch.nn.Module, arch: str, img_size: int, folder: str | Path) -> Path:
    """Write ``folder`` as timm / Hugging Face write it (``config.json`` with the true pretrained config,
    ``model.safetensors``) from a :func:`timm_vit` model, so ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` builds it, loads the weights and declares their preprocessing."""
    import timm

    folder = Path(folder)
    timm.models.save_for_hf(model, str(folder), model_args=timm_model_args(arch, img_size), safe_serialization=True)
    return folder


def check_export_target(out: Path) -> None:
    """``out`` can take the export: a ``.pth`` file (the timm folder is ``out`` without its suffix, so
    without one the two would share a name), neither it nor the folder's place taken by the other kind."""
    if out.suffix != ".pth":
        raise ConfigError(f"output {out}: name the file with .pth (e.g. {out.with_name(out.name + '.pth')}); "
                          "the timm folder is written beside it under the name without .pth")
    folder = out.with_suffix("")
    if out.is_dir():
        raise ConfigError(f"output {out} is a directory; name the .pth file to write")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output {out}: {folder} is a file, where the timm folder goes; move it or choose "
                          "another output name")


def encoder_arch(sd: dict, where: str) -> tuple[str, int]:
    """(our arch name, input size) of the ViT encoder in a state dict (other keys ignored), read off its
    tensor shapes; a CheckpointError that starts with ``where`` if it holds none of our ViTs."""
    try:
        return infer_arch({k: v for k, v in sd.items() if is_encoder_key(k)}, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def export_encoder(path: str | Path, which: str, out: str | Path) -> Path:
    """Save the encoder of ``which`` model as ``{"model": <timm VisionTransformer keys>, ...}`` (``out``,
    for MAE-style loaders) and as a timm folder beside it (``out`` without its suffix; see
    :func:`save_timm_folder`). Everything is checked (the output names, the checkpoint, that the encoder
    loads into timm's model) before the first byte is written."""
    out = Path(out)
    check_export_target(out)
    ckpt = read_checkpoint(path)
    chosen, sd = ckpt.model(which)
    encoder = {k: v for k, v in sd.items() if is_encoder_key(k)}
    if not any(k.startswith("blocks.") for k in encoder):
        raise CheckpointError(f"{path}: the {chosen} weights hold no encoder blocks")
    meta = {"source": ckpt.source, "which": chosen, "from": str(path)}
    if ckpt.source == "ours":
        meta["step"] = ckpt.raw.get("step")
    arch, img_size = encoder_arch(encoder, str(path))
    meta.update(arch=arch, img_size=img_size)
    hint = "An encoder needs the patch embedding, the blocks and the final norm."
    if ckpt.source == "ours-classifier":
        hint = (f"This is a fine-tuned classifier (global_pool={ckpt.raw.get('global_pool')}); one fine-tuned "
                "with global_pool=avg has fc_norm in place of the final norm, so it holds no encoder for "
                "timm's token-pooled ViT: use the classifier itself (its timm folder, classifier_best/).")
    model = timm_vit(encoder, arch, img_size, f"{path} ({ckpt.source}, {chosen} weights)", hint=hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": encoder, "meta": meta}, out)
    folder = save_timm_folder(model, arch, img_size, out.with_suffix(""))
    log.info("exported the %s encoder of %s (%s, %d px, %d tensors) to %s and %s/", chosen, path, arch, img_size,
             len(encoder), out, folder)
    return out
