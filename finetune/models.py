"""Classifiers: timm's VisionTransformer with our sizes, initialised from any supported checkpoint."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from rcmae.core.checkpoint import LoadReport, load_state, read_checkpoint
from rcmae.core.vit import is_encoder_key

log = logging.getLogger(__name__)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of the patch part of (1, 1 + H*W, D) to ``grid``; the cls token is kept.
    Unchanged when the grid already matches."""
    old = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if (old, old) == tuple(grid):
        return pos_embed
    log.info("interpolating pos_embed from %dx%d to %dx%d (bicubic)", old, old, *grid)
    return resample_abs_pos_embed(pos_embed, list(grid), num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)


def load_backbone(model: VisionTransformer, path: str, which: str = "auto") -> LoadReport:
    """Initialise ``model``'s backbone from a checkpoint: ours (pretraining: teacher by default;
    or a classifier), official MAE / RC-MAE, or timm. The head is always new.

    Only the new ``head`` and ``fc_norm`` may be missing; the pretraining decoder, a previous head
    and (with global average pooling) the final ``norm`` are dropped, each listed in the report. Any
    other missing or unexpected key, or a shape mismatch, is an error (:func:`load_state`).
    """
    ckpt = read_checkpoint(path)
    chosen, sd = ckpt.model(which)
    own = model.state_dict()
    dropped = [k for k in sd if (not is_encoder_key(k) and k not in own) or k.startswith("head.")
               or (k.startswith("norm.") and "norm.weight" not in own)  # avg pool: MAE drops the final norm
               or (k.startswith("fc_norm.") and "fc_norm.weight" not in own)]  # token pool: no fc_norm
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.patch_embed.grid_size)
    return load_state(model, sd, f"{path} ({ckpt.source}, {chosen} weights)",
                      may_miss=lambda key: key.startswith(("head.", "fc_norm.")), dropped=dropped,
                      hint="Check model.arch against the checkpoint.", source=ckpt.source, which=chosen)


def probe_head(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """MAE's probe: BatchNorm without affine, then a Linear (weights truncated normal, std 0.01; zero bias)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def linear_probe_head(model: VisionTransformer) -> None:
    """MAE's linear probe: the backbone frozen, the head replaced by :func:`probe_head`."""
    for p in model.parameters():
        p.requires_grad = False
    model.head = probe_head(model.head.in_features, model.head.out_features)


def fold_probe(head: nn.Sequential) -> dict[str, torch.Tensor]:
    """A probe's BatchNorm (running statistics) folded into its Linear: ``{"weight", "bias"}`` of one layer."""
    bn, linear = head
    scale = (bn.running_var + bn.eps).rsqrt()
    return {"weight": (linear.weight * scale).detach().clone(),
            "bias": (linear.bias - (linear.weight * scale) @ bn.running_mean).detach().clone()}


def classifier_state(model: VisionTransformer) -> dict:
    """State dict in timm's key names: a BatchNorm + Linear probe head is folded into one Linear,
    so every saved classifier loads into ``timm.create_model(...)`` as is."""
    sd = dict(model.state_dict())
    if isinstance(model.head, nn.Sequential):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({f"head.{k}": v for k, v in fold_probe(model.head).items()})
    return {k: v.detach().clone() if k.startswith("head.") else v for k, v in sd.items()}


def init_head(model: VisionTransformer, std: float) -> None:
    """MAE's fine-tuning head: truncated normal with a tiny std, zero bias."""
    nn.init.trunc_normal_(model.head.weight, std=std)
    nn.init.zeros_(model.head.bias)
