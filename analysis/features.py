"""Feature pictures of a ViT encoder, as the DINO / DINOv2 papers draw them: the last block's attention of
the class token over the patches (one map per head), and the PCA of the patch tokens (DINOv2's recipe: a
first component separates foreground from background, a second PCA of the foreground patches is shown as
RGB). ``tools/visualize.py --kind attention,pca`` draws them for any checkpoint ``rcmae.load_model`` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from rcmae.core.checkpoint import WHICH
from rcmae.core.errors import CheckpointError
from rcmae.core.plotting import plt, save_figure
from rcmae.core.vit import build_classifier
from rcmae.pretrain.rcmae import RCMAE


# ----------------------------------------------------------------------------- the encoder
def feature_vit(model, which: str = "auto") -> VisionTransformer:
    """timm's ``VisionTransformer`` (no head, class-token pooling) of what :func:`rcmae.load_model` returns:
    a timm ViT as it is; the teacher's (``auto``, ``teacher``) or the student's (``student``; ``auto`` on an
    MAE without teacher) encoder of an :class:`RCMAE`, loaded strictly. Anything else (a ResNet) is a
    :class:`CheckpointError`: attention maps and patch features need a ViT."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(model, VisionTransformer):
        return model.eval()
    if not isinstance(model, RCMAE):
        raise CheckpointError(f"a {type(model).__name__} is no Vision Transformer: attention maps and patch features "
                              "need a ViT (a pretraining checkpoint, an encoder or a ViT classifier)")
    return model.encoder(which).eval()


def random_vit(arch: str, img_size: int, seed: int = 0) -> VisionTransformer:
    """A randomly initialised ``arch`` (timm's initialisation, seeded; the global RNG is left as it was): the
    baseline of ``random:ARCH[@IMG]`` (parsed by :func:`rcmae.benchmark.plan.read_backbone`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_classifier(arch, img_size, 0, "token").eval()


def grid(vit: VisionTransformer) -> tuple[int, int]:
    return tuple(vit.patch_embed.grid_size)


# ----------------------------------------------------------------------------- attention
@torch.no_grad()
def cls_attention(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the class token over the patch tokens, (B, heads, gh, gw): timm's own
    softmax, caught at ``attn_drop`` with the fused kernel off for this one forward (then restored)."""
    if vit.cls_token is None:
        raise ValueError(f"{type(vit).__name__} has no class token: no class-token attention to draw")
    attn = vit.blocks[-1].attn
    caught = []
    hook = attn.attn_drop.register_forward_hook(lambda module, inputs, output: caught.append(output))
    fused, training = attn.fused_attn, vit.training
    attn.fused_attn = False
    vit.eval()
    try:
        vit.forward_features(imgs)
    finally:
        hook.remove()
        attn.fused_attn = fused
        vit.train(training)
    weights = caught[0][:, :, 0, vit.num_prefix_tokens:]  # (B, heads, patches)
    return weights.reshape(*weights.shape[:2], *grid(vit))


# ----------------------------------------------------------------------------- PCA of the patch tokens
class PatchPCA(NamedTuple):
    rgb: torch.Tensor  # (B, gh, gw, 3) in [0, 1]: the foreground's 3 principal components, background black
    foreground: torch.Tensor  # (B, gh, gw) bool: first component > 0
    first: torch.Tensor  # (B, gh, gw): the first component, centred, oriented so the border is negative


def principal_axes(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` principal components of the rows of ``x`` (N, D), centred: (N, k), zeros past rank."""
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return F.pad(x @ vh[:k].T, (0, max(0, k - vh.shape[0])))


def pca_rgb(tokens: torch.Tensor, joint: bool = True) -> PatchPCA:
    """DINOv2's figure recipe on patch tokens (B, gh, gw, D) of all images together: the first principal
    component, its sign chosen so that most image-border patches are negative (background), thresholded at
    0; then a PCA of the foreground patches alone, its first three components min-max scaled to RGB.
    ``joint=False``: the same for each image alone."""
    if not joint:
        return PatchPCA(*(torch.cat(parts) for parts in zip(*(pca_rgb(t[None]) for t in tokens))))
    b, gh, gw, d = tokens.shape
    x = tokens.reshape(-1, d).double()
    first = principal_axes(x, 1)[:, 0].reshape(b, gh, gw)
    border = torch.ones(gh, gw, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if (first[:, border] > 0).double().mean() > 0.5:
        first = -first
    fg = first > 0
    rgb = torch.zeros(b * gh * gw, 3, dtype=torch.float64)
    if fg.sum() > 1:
        comps = principal_axes(x[fg.flatten()], 3)
        low, high = comps.min(0).values, comps.max(0).values
        rgb[fg.flatten()] = (comps - low) / (high - low).clamp_min(1e-12)
    return PatchPCA(rgb.reshape(b, gh, gw, 3).float(), fg, first.float())


@torch.no_grad()
def patch_pca(vit: VisionTransformer, imgs: torch.Tensor, joint: bool = True) -> PatchPCA:
    """:func:`pca_rgb` of the final (normed) patch tokens of ``imgs``, (B, 3, H, W) normalised images: one PCA
    over all the images (``joint``: DINOv2's figures, images of one category), or one per image (images of
    different classes, whose first joint component would tell the images apart rather than their objects)."""
    was = vit.training
    tokens = vit.eval().forward_features(imgs)[:, vit.num_prefix_tokens:]
    vit.train(was)
    return pca_rgb(tokens.reshape(imgs.shape[0], *grid(vit), -1), joint)


# ----------------------------------------------------------------------------- figures
def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) maps at the image's size, each patch a block (nearest)."""
    return F.interpolate(maps.float(), size=size, mode="nearest")


def figure(rows: list[list[tuple[torch.Tensor, dict]]], titles: list[str], path, title: str) -> Path:
    """A grid of panels, one (array, imshow options) per cell, 2 inches a cell at 80 dpi (160 px)."""
    n, m = len(rows), len(titles)
    fig, axes = plt.subplots(n, m, figsize=(2 * m, 2 * n), squeeze=False)
    for i, row in enumerate(rows):
        for j, (array, options) in enumerate(row):
            axes[i, j].imshow(array.cpu().numpy(), **options)
            axes[i, j].axis("off")
    for j, name in enumerate(titles):
        axes[0, j].set_title(name)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=80)


def save_attention(vit: VisionTransformer, imgs: torch.Tensor, pictures: torch.Tensor, path, title: str = "") -> Path:
    """One row per image: image | mean over heads | head 1 .. H. ``imgs`` are the normalised model inputs,
    ``pictures`` the same images for display, (B, 3, H, W) in [0, 1]."""
    attn = cls_attention(vit, imgs)
    maps = upsample(torch.cat([attn.mean(1, keepdim=True), attn], 1), pictures.shape[-2:])
    rows = [[(pic.permute(1, 2, 0), {})] + [(m, {"cmap": "inferno"}) for m in img_maps]
            for pic, img_maps in zip(pictures, maps)]
    titles = ["image", "mean of heads"] + [f"head {h + 1}" for h in range(attn.shape[1])]
    return figure(rows, titles, path, title)


def save_pca(vit: VisionTransformer, imgs: torch.Tensor, pictures: torch.Tensor, path, title: str = "",
             joint: bool = True) -> Path:
    """One row per image: image | first component (red: foreground, blue: background) | PCA RGB of the
    foreground. ``joint``: one PCA over all images, so colours compare across rows; else one per image."""
    pca = patch_pca(vit, imgs, joint)
    size = pictures.shape[-2:]
    first = upsample(pca.first.unsqueeze(1), size)[:, 0]
    rgb = upsample(pca.rgb.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
    scale = float(pca.first.abs().max()) or 1.0
    rows = [[(pic.permute(1, 2, 0), {}), (f, {"cmap": "coolwarm", "vmin": -scale, "vmax": scale}), (c, {})]
            for pic, f, c in zip(pictures, first, rgb)]
    return figure(rows, ["image", "1st component", "PCA (foreground)"], path, title)
