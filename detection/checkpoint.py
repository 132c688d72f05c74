"""Weights for detectron2's ViTDet: backbone weights by explicit key conversion with a strict load
report, and whole-detector checkpoints through a strict detectron2 checkpointer.

detectron2's own loader matches names heuristically and skips what it cannot match, or what has
another shape, with only a log line; here every encoder tensor is mapped by name to the ViT's place
in the detector (``backbone.net.*`` in ViTDet, ``backbone.bottom_up.net.*`` in the benchmark's FPN
model) and the load fails if any ViT block weight was not loaded, and a detector checkpoint with a
missing tensor or one of another shape is an error naming the key.
"""
from __future__ import annotations

import logging
import math

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.vit import ViT
from timm.layers import resample_patch_embed

from rcmae.core.checkpoint import LoadReport, load_state, read_checkpoint
from rcmae.core.errors import CheckpointError

log = logging.getLogger(__name__)

# pretraining-only or not used by ViTDet (no cls token, no final norm)
DROPPED = ("cls_token", "norm.", "fc_norm.", "head.", "mask_token", "decoder")


def vit_of(model: torch.nn.Module) -> tuple[str, ViT]:
    """The detector's ViT and its key prefix (``backbone.net.`` in ViTDet)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ViT)]
    if len(found) != 1:
        raise CheckpointError(f"expected one detectron2 ViT in the model, found {len(found)}")
    return found[0][0] + ".", found[0][1]


def convert_to_detectron2(path: str, which: str = "auto", patch_size: int | None = None,
                          prefix: str = "backbone.net.") -> dict:
    """Encoder of a pretraining (ours: teacher by default; MAE; RC-MAE), exported, fine-tuned or timm
    checkpoint, renamed to ``<prefix>*``. ``patch_size``: resample the patch-embedding kernel
    (ViT-H/14 -> 16, as ViTDet does)."""
    ckpt = read_checkpoint(path)
    chosen, sd = ckpt.model(which)
    if not any(k.startswith("blocks.") for k in sd):
        raise CheckpointError(f"{path} ({ckpt.source}) holds no ViT blocks (keys like blocks.0.attn.qkv.weight); "
                              f"found {sorted(sd)[:8]}")
    out = {}
    for k, v in sd.items():
        if k.startswith(DROPPED):
            continue
        if k == "patch_embed.proj.weight" and patch_size and v.shape[-1] != patch_size:
            log.info("resampling the patch embedding from %dx%d to %dx%d", v.shape[-2], v.shape[-1],
                     patch_size, patch_size)
            v = resample_patch_embed(v, [patch_size, patch_size])
        out[prefix + k] = v
    log.info("converted %d encoder tensors of %s (%s, %s weights) to detectron2 keys", len(out), path,
             ckpt.source, chosen)
    return out


def load_vit_backbone(model: torch.nn.Module, path: str, which: str = "auto") -> LoadReport:
    """Load the converted encoder into a detectron2 model (:func:`load_state`); fail loudly unless every
    ViT block and embedding tensor is loaded. Only the relative position tables (ViTDet initialises them
    at zero), the pyramid and the heads start from their initialisation, and a position grid of the
    backbone's own (MIMDet's sin-cos, ``MultiDepthViT(sincos_pos_grid=True)``), which replaces the
    checkpoint's."""
    prefix, net = vit_of(model)
    sd = convert_to_detectron2(path, which, net.patch_embed.proj.kernel_size[0], prefix)
    grid_key = prefix + "pos_embed"
    own_grid = any(getattr(m, "sincos_pos_grid", False) for m in model.modules())
    dropped = [grid_key] if own_grid and sd.pop(grid_key, None) is not None else []
    pos_embed = sd.get(grid_key)
    hint = (pos_embed_hint(net, tuple(pos_embed.shape), prefix)
            if pos_embed is not None and pos_embed.shape != net.pos_embed.shape else None)
    return load_state(model, sd, f"{path} as the ViTDet backbone", dropped=dropped,
                      may_miss=lambda key: not key.startswith(prefix) or ".rel_pos_" in key
                      or (own_grid and key == grid_key),
                      hint=hint or "Check the config's embed_dim / depth / patch_size / pretrain_img_size.")


def pos_embed_hint(net: torch.nn.Module, shape: tuple, prefix: str) -> str | None:
    """How to make detectron2's ViT take a position embedding of ``shape`` (1, positions, dim) as it is.

    The ViT stores the pretraining grid (``pretrain_img_size / patch_size`` a side, plus the cls
    row) and resizes it to the input's grid at every forward (``get_abs_pos``, bicubic). Declaring
    the checkpoint's grid through ``pretrain_img_size`` therefore reproduces the model that was saved;
    resampling the checkpoint to the config's grid first would add a second interpolation it was
    never trained with. None if the checkpoint's positions do not form a square grid of this width.
    """
    cls_rows = 1 if net.pretrain_use_cls_token else 0
    side = math.isqrt(shape[1] - cls_rows)
    own = net.pos_embed.shape
    if side * side != shape[1] - cls_rows or shape[2] != own[2]:
        return None
    own_side = math.isqrt(own[1] - cls_rows)
    patch = net.patch_embed.proj.kernel_size[0]
    return (f"{prefix}pos_embed holds a {side}x{side} position grid ({shape[1]} positions), the config "
            f"a {own_side}x{own_side} one (pretrain_img_size {own_side * patch} / patch {patch}); "
            f"detectron2's ViT resizes the stored grid to the input's at run time, so add the override "
            f"model.{prefix}pretrain_img_size={side * patch} to use these weights as they were trained")


class StrictDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer for whole detectors, where a tensor of another shape or a missing
    one (detectron2 logs and skips them, keeping random weights) is an error naming the key."""

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        problems = []
        for key, saved, wanted in incompatible.incorrect_shapes:
            prefix, net = vit_of(self.model)
            hint = pos_embed_hint(net, saved, prefix) if key == prefix + "pos_embed" else None
            problems.append(hint or f"{key} has shape {tuple(saved)} in the checkpoint, {tuple(wanted)} in the "
                                    f"model built from the config")
        reshaped = {key for key, _, _ in incompatible.incorrect_shapes}  # dropped, so also "missing"
        missing = [k for k in incompatible.missing_keys if k not in reshaped]
        if missing:
            problems.append(f"{len(missing)} tensors of the model are not in the checkpoint ({missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}): not a checkpoint of this detector (backbone "
                            f"weights go to training through train.init_checkpoint)")
        if problems:
            raise CheckpointError("; ".join(problems))
        return incompatible


def load_detector(model: torch.nn.Module, path: str, output_dir: str, resume: bool) -> str:
    """Load a whole detector checkpoint strictly: ``path``, or with ``resume`` the output directory's
    last checkpoint when there is one. Returns the file loaded."""
    checkpointer = StrictDetectionCheckpointer(model, output_dir)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    try:
        checkpointer.load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not fit the model of the config: {e}") from None
    return path
