"""Multi-scale features from a plain ViT: the backbone of the Mask R-CNN benchmark of Li et al. 2021
("Benchmarking Detection Transfer Learning with Vision Transformers"), as hustvl/MIMDet reproduces it
on detectron2 (``models/benchmarking.py``) and as the RC-MAE paper used it for its COCO table.

ViTDet (Li et al. 2022) builds its pyramid from the last block's map alone; the benchmark takes the map
after each global-attention block (every quarter of the depth) and rescales the four to strides 4, 8, 16
and 32 for an FPN:

    stride 4: 2x2 deconv, GroupNorm(32), GELU, 2x2 deconv    stride 8: 2x2 deconv
    stride 16: as it is                                      stride 32: 2x2 max pool

The transformer is detectron2's own ``ViT`` (windowed and global blocks, relative positions), kept
under ``net`` so that pretrained encoders load with the same strict conversion as ViTDet.
"""
from __future__ import annotations

import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.vit import ViT, get_abs_pos

OUT_FEATURES = ("s0", "s1", "s2", "s3")


class MultiDepthViT(Backbone):
    """``net``'s token maps after blocks ``out_blocks`` (4 of them, shallow to deep) as features
    ``s0``-``s3`` at strides patch/4, patch/2, patch, 2 x patch (4 / 8 / 16 / 32 for patch 16).
    ``square_pad``: pad inputs to this square size (the benchmark trains and tests on 1024 x 1024)."""

    def __init__(self, net: ViT, out_blocks: list[int], square_pad: int = 0):
        super().__init__()
        if len(out_blocks) != 4 or sorted(out_blocks) != list(out_blocks) or out_blocks[-1] >= len(net.blocks):
            raise ValueError(f"out_blocks must be 4 increasing block indices below depth {len(net.blocks)}, "
                             f"got {out_blocks}")
        self.net, self.out_blocks, self._square_pad = net, list(out_blocks), square_pad
        dim, patch = net.patch_embed.proj.out_channels, net.patch_embed.proj.kernel_size[0]
        self.rescale = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GroupNorm(32, dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, 2)),
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self._out_features = list(OUT_FEATURES)
        self._out_feature_channels = {f: dim for f in OUT_FEATURES}
        self._out_feature_strides = {f: patch * 2 ** i // 4 for i, f in enumerate(OUT_FEATURES)}

    @property
    def padding_constraints(self) -> dict:
        return {"size_divisibility": max(self._out_feature_strides.values()), "square_size": self._square_pad}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in OUT_FEATURES}

    def forward(self, x):
        net = self.net
        x = net.patch_embed(x)  # (N, H, W, C)
        if net.pos_embed is not None:
            x = x + get_abs_pos(net.pos_embed, net.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        maps = []
        for i, block in enumerate(net.blocks[:self.out_blocks[-1] + 1]):
            x = block(x)
            if i in self.out_blocks:
                maps.append(x.permute(0, 3, 1, 2))
        return {f: rescale(m) for f, rescale, m in zip(OUT_FEATURES, self.rescale, maps)}
