"""Multi-scale features from a plain ViT: the backbone of the Mask R-CNN benchmark of Li et al. 2021
("Benchmarking Detection Transfer Learning with Vision Transformers"), as hustvl/MIMDet reproduces it
on detectron2 (``models/benchmarking.py``) and as the RC-MAE paper used it for its COCO table.

ViTDet (Li et al. 2022) builds its pyramid from the last block's map alone; the benchmark takes the map
after each global-attention block (every quarter of the depth) and rescales the four to strides 4, 8, 16
and 32 for an FPN:

    stride 4: 2x2 deconv, GroupNorm(32), GELU, 2x2 deconv    stride 8: 2x2 deconv
    stride 16: as it is                                      stride 32: 2x2 max pool

The transformer is detectron2's own ``ViT`` (windowed and global blocks, relative positions), kept
under ``net`` so that pretrained encoders load with the same strict conversion as ViTDet. The square
padding of the benchmark (1024 x 1024) is the FPN's ``square_pad``: detectron2's
``GeneralizedRCNN.preprocess_image`` reads the padding constraints of the outer backbone only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.vit import ViT, get_abs_pos

from rcmae.detection.mimdet import mimdet_pos_grid

OUT_FEATURES = ("s0", "s1", "s2", "s3")


class MultiDepthViT(Backbone):
    """``net``'s token maps after blocks ``out_blocks`` (4 of them, shallow to deep) as features
    ``s0``-``s3`` at strides patch/4, patch/2, patch, 2 x patch (4 / 8 / 16 / 32 for patch 16).

    ``sincos_pos_grid``: MIMDet's position embedding instead of the pretrained one. ``net``'s grid must
    then be the input's, without a cls row (``pretrain_img_size`` = the padded input size,
    ``pretrain_use_cls_token=False``); it starts as MIMDet's sin-cos (:func:`mimdet_pos_grid`), is
    trained, and no checkpoint's ``pos_embed`` is loaded into it (``load_vit_backbone``)."""

    def __init__(self, net: ViT, out_blocks: list[int], sincos_pos_grid: bool = False):
        super().__init__()
        if len(out_blocks) != 4 or sorted(out_blocks) != list(out_blocks) or out_blocks[-1] >= len(net.blocks):
            raise ValueError(f"out_blocks must be 4 increasing block indices below depth {len(net.blocks)}, "
                             f"got {out_blocks}")
        self.net, self.out_blocks, self.sincos_pos_grid = net, list(out_blocks), sincos_pos_grid
        if sincos_pos_grid:
            if net.pos_embed is None or net.pretrain_use_cls_token:
                raise ValueError("sincos_pos_grid needs a ViT with an absolute position grid and no cls row "
                                 "(use_abs_pos=True, pretrain_use_cls_token=False)")
            positions, width = net.pos_embed.shape[1:]
            with torch.no_grad():
                net.pos_embed.copy_(mimdet_pos_grid(width, math.isqrt(positions)))
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
