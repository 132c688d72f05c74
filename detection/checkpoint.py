"""Backbone weights for detectron2's ViTDet: explicit key conversion and a strict load report.

detectron2's own loader matches names heuristically and skips what it cannot match with only a log
line; here every encoder tensor is mapped by name to ``backbone.net.*`` and the load fails if any
ViT block weight was not loaded.
"""
from __future__ import annotations

import logging

import torch
from timm.layers import resample_patch_embed

from pretrain.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

PREFIX = "backbone.net."
# pretraining-only or not used by ViTDet (no cls token, no final norm)
DROPPED = ("cls_token", "norm.", "fc_norm.", "head.", "mask_token", "decoder")


def convert_to_detectron2(path: str, which: str = "auto", patch_size: int | None = None) -> dict:
    """Encoder of a pretraining (ours: teacher by default; MAE; RC-MAE), exported, fine-tuned or timm
    checkpoint, renamed to ``backbone.net.*``. ``patch_size``: resample the patch-embedding kernel
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
        out[PREFIX + k] = v
    log.info("converted %d encoder tensors of %s (%s, %s weights) to detectron2 keys", len(out), path,
             ckpt.source, chosen)
    return out


def load_backbone(model: torch.nn.Module, path: str, which: str = "auto") -> dict:
    """Load the converted encoder into a detectron2 model; fail loudly unless every ViT block and
    embedding tensor (relative position tables excepted: ViTDet initialises them at zero) is loaded."""
    net = model.backbone.net
    sd = convert_to_detectron2(path, which, net.patch_embed.proj.kernel_size[0])
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    wanted = [k for k in own if k.startswith(PREFIX) and ".rel_pos_" not in k]
    missing = [k for k in wanted if k not in sd]
    if unexpected or shapes or missing:
        raise CheckpointError(
            f"{path} does not fit the ViTDet backbone: "
            + "; ".join(f"{n} {v[:10]}{' ...' if len(v) > 10 else ''}" for n, v in
                        (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if v)
            + ". Check the config's embed_dim / depth / patch_size / pretrain_img_size.")
    model.load_state_dict(sd, strict=False)
    blocks = len({k.split(".")[3] for k in sd if k.startswith(PREFIX + "blocks.")})
    log.info("loaded %d backbone tensors (%d of %d ViT blocks, position embedding, patch embedding); "
             "relative position tables, pyramid and heads start from their initialisation",
             len(sd), blocks, len(net.blocks))
    return {"loaded": len(sd), "blocks": blocks}
