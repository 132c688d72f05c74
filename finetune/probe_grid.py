"""The linear-probe grid (as DINOv2's ``eval/linear.py``): N probes, learning rates x feature kinds, trained on
the same augmented batches from one forward pass of the frozen backbone.

Each probe is MAE's (BatchNorm without affine + Linear, init std 0.01) and has its own LARS parameter group
whose lr is the run's schedule times ``lr_h / peak lr``: LARS scales and keeps momentum per tensor, and the
summed loss gives each head exactly its own gradient, so the grid trains each head as its own run would
(``tests/test_probe_grid.py`` checks it head by head).

Feature kinds, joined by ``+`` (concatenated): ``cls`` (the final-normed class token: MAE's probe),
``avgpool`` (the mean of the final-normed patch tokens, as DINOv2), ``cls_last<k>`` (the class tokens of the
last k blocks, each through the final norm, concatenated: DINOv2's ``n_last_blocks``).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from rcmae.core.errors import ConfigError
from rcmae.finetune.models import probe_head

PART = re.compile(r"cls|avgpool|cls_last([1-9][0-9]*)")


@dataclass(frozen=True)
class HeadSpec:
    base_lr: float
    feature: str

    @property
    def name(self) -> str:
        return f"{self.feature}@{self.base_lr:g}"


def feature_parts(feature: str, depth: int, what: str = "grid.features") -> list[tuple[str, int]]:
    """``cls_last4+avgpool`` -> [("cls", 4), ("avgpool", 1)]: the token kind and how many last blocks."""
    parts = []
    for part in feature.split("+"):
        match = PART.fullmatch(part)
        if match is None:
            raise ConfigError(f"{what}: {feature!r} is not a feature kind: join cls, avgpool and cls_last<k> "
                              "with + (e.g. cls_last4+avgpool)")
        blocks = int(match.group(1) or 1)
        if blocks > depth:
            raise ConfigError(f"{what}: {feature!r} takes the last {blocks} blocks of a {depth}-block backbone")
        parts.append(("avgpool" if part == "avgpool" else "cls", blocks))
    return parts


def grid_specs(grid: dict, base_lr: float, depth: int) -> list[HeadSpec]:
    """The heads of a ``grid`` section (``base_lrs`` x ``features``; an empty list: the run's ``optim.base_lr``
    / ``cls``), or [] when both lists are empty (MAE's single head)."""
    if not grid["base_lrs"] and not grid["features"]:
        return []
    lrs, features = grid["base_lrs"] or [base_lr], grid["features"] or ["cls"]
    for lr in lrs:
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError(f"grid.base_lrs: {lr!r} is not a positive learning rate")
    for feature in features:
        feature_parts(feature, depth)
    specs = [HeadSpec(float(lr), feature) for feature in features for lr in lrs]
    repeated = sorted({s.name for s in specs if specs.count(s) > 1})
    if repeated:
        raise ConfigError(f"grid: heads {', '.join(repeated)} appear twice (repeated base_lrs or features)")
    return specs


class ProbeGrid(nn.Module):
    """A frozen ViT (timm ``VisionTransformer``) and one probe per :class:`HeadSpec`; ``forward`` gives the
    logits of every head, stacked: (heads, batch, classes)."""

    def __init__(self, backbone: VisionTransformer, specs: list[HeadSpec], num_classes: int, seed: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.specs, depth, dim = specs, len(backbone.blocks), backbone.embed_dim
        self.parts = {s.feature: feature_parts(s.feature, depth) for s in specs}
        self.blocks = max(k for parts in self.parts.values() for _, k in parts)
        # each head's weights drawn from (seed, feature kind) alone: it starts where its own run would
        self.heads = nn.ModuleList(
            probe_head(sum(k * dim if kind == "cls" else dim for kind, k in self.parts[s.feature]), num_classes,
                       torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.feature.encode())))
            for s in specs)

    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each feature kind of the grid, from one pass through the backbone."""
        taken = self.backbone.forward_intermediates(imgs, indices=self.blocks, return_prefix_tokens=True, norm=True,
                                                    output_fmt="NLC", intermediates_only=True)
        cls = [prefix[:, 0] for _, prefix in taken]  # oldest block first
        avgpool = taken[-1][0].mean(dim=1)
        return {feature: torch.cat([torch.cat(cls[len(cls) - k:], dim=1) if kind == "cls" else avgpool
                                    for kind, k in parts], dim=1)
                for feature, parts in self.parts.items()}

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        features = self.features(imgs)
        return torch.stack([head(features[s.feature]) for s, head in zip(self.specs, self.heads)])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no drop path, whatever the mode
        return self
