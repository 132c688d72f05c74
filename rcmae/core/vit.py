"""The ViT size registry (the sizes every package builds) and timm's ``VisionTransformer`` with them."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from rcmae.core.errors import ConfigError

# Encoder sizes (micro: tests, mini: the CPU demo); `timm_name` is the timm model an exported
# encoder loads into (224 px input).
ARCHS = {
    "vit_micro_patch8": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, timm_name=None),
    "vit_mini_patch8": dict(patch_size=8, embed_dim=128, depth=4, num_heads=4, timm_name=None),
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                             timm_name="vit_tiny_patch16_224"),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                              timm_name="vit_small_patch16_224"),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                             timm_name="vit_base_patch16_224"),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                              timm_name="vit_large_patch16_224"),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                             timm_name="vit_huge_patch14_224"),
}


ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def infer_arch(sd: dict, path: str) -> tuple[str, int]:
    """(our arch name, input size) of a ViT state dict, read off its tensor shapes."""
    try:
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    except (KeyError, ValueError):
        raise ValueError(f"{path}: not a ViT state dict (no cls_token / patch_embed / blocks / pos_embed)") from None
    for name, spec in ARCHS.items():
        if (spec["embed_dim"], spec["depth"], spec["patch_size"]) == (dim, depth, patch):
            return name, grid * patch
    raise ValueError(f"{path}: a ViT of width {dim}, depth {depth}, patch {patch} is none of ours ({', '.join(ARCHS)})")


def is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES)


GLOBAL_POOLS = ("avg", "token")  # patch-token mean + fc_norm (MAE's fine-tuning), or the class token


def check_arch(arch: str, img_size: int) -> dict:
    """The size spec of ``arch``; a ConfigError for an unknown name or an image size that is not a
    multiple of its patch size."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {sorted(ARCHS)}")
    spec = {k: v for k, v in ARCHS[arch].items() if k != "timm_name"}
    if img_size % spec["patch_size"]:
        raise ConfigError(f"model.img_size={img_size} is not a multiple of the patch size "
                          f"{spec['patch_size']} of {arch}")
    return spec


def build_classifier(arch: str, img_size: int, num_classes: int, global_pool: str = "avg",
                     drop_path: float = 0.0) -> VisionTransformer:
    """The timm model (``vit_base_patch16_224`` etc. for 224 px) with ``global_pool`` ``avg``
    (patch-token mean + ``fc_norm``, no final ``norm``, as MAE fine-tunes) or ``token`` (cls)."""
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"model.global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    spec = check_arch(arch, img_size)
    return VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path, mlp_ratio=4.0, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **spec)


def sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, shape (1, [1 +] grid_size**2, dim) in MAE's layout.

    The first half of the channels encodes the column index, the second half the row index; each
    half is [sin, cos] at frequencies 1 / 10000**(i / (dim/4)). The cls token gets a zero row.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):  # (N,) -> (N, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
