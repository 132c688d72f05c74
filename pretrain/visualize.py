"""Reconstruction figure: original | masked | student | teacher, one row per image."""
from __future__ import annotations

from pathlib import Path

import torch

from rcmae.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rcmae.core.plotting import plt, save_figure
from rcmae.pretrain.models import patchify, unpatchify
from rcmae.pretrain.rcmae import RCMAE


def _to_pixels(pred: torch.Tensor, imgs: torch.Tensor, model: RCMAE) -> torch.Tensor:
    """Predictions (N, L, p*p*3) back to normalised image space; norm-pix predictions get the
    statistics of the original patch (as MAE's visualisation does)."""
    p = model.student.patch_size
    if model.student.norm_pix_loss:
        target = patchify(imgs, p)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    return unpatchify(pred, p)


@torch.no_grad()
def save_reconstruction(model: RCMAE, imgs: torch.Tensor, noise: torch.Tensor, path: str | Path,
                        title: str = "") -> Path:
    was_training = model.training
    model.eval()
    out = model(imgs, noise)
    model.train(was_training)
    p = model.student.patch_size
    mask = out["mask"].unsqueeze(-1).expand(-1, -1, p * p * 3)
    mask = unpatchify(mask, p)  # 1 = masked pixel
    columns = {"original": imgs, "masked": imgs * (1 - mask)}
    for name, key in (("student", "pred"), ("teacher", "teacher_pred")):
        if key in out:
            columns[name] = imgs * (1 - mask) + _to_pixels(out[key], imgs, model) * mask
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2 * len(columns), 2 * n), squeeze=False)
    for j, (name, x) in enumerate(columns.items()):
        x = (x * std + mean).clamp(0, 1).float().cpu()
        for i in range(n):
            axes[i, j].imshow(x[i].permute(1, 2, 0).numpy())
            axes[i, j].axis("off")
        axes[0, j].set_title(name)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=80)
