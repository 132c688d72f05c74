"""RC-MAE: an MAE student plus an EMA ("mean") teacher that sees the same masked input.

loss = recon + gamma * consistency, where
  recon       = MSE(student prediction, pixel target), mean over pixels, then over masked patches;
  consistency = MSE(student prediction, teacher prediction), same averaging, teacher detached.
gamma = 0 builds no teacher: plain MAE at MAE's cost.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .models import MaskedAutoencoderViT, masked_mean, random_masking_ids


MOMENTUM_SCHEDULES = ("cosine", "official")


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Entry ``step`` of a cosine from ``base`` (step 0) to 1 (step ``total_steps``)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


def teacher_momenta(schedule: str, step: int, steps_per_epoch: int, total_steps: int, accum: int,
                    base: float) -> list[float]:
    """Momenta of the EMA updates belonging to optimizer step ``step`` (0-based, global), in order.

    ``cosine`` (ours): one update after the optimizer step; the cosine runs over the optimizer
    steps of the whole run.
    ``official`` (the official RC-MAE ``engine_pretrain.py``, which produced the paper's numbers):
    one update after every micro-batch, the last one after the optimizer step; the cosine table has
    epochs x micro-batches-per-epoch entries but is indexed by the micro-batch *within the epoch*,
    so the momentum never leaves ~``base``. Under accumulation A the teacher moves A times per
    optimizer step (A - 1 times towards the not yet updated student).
    """
    if schedule == "cosine":
        return [momentum_at(step, total_steps, base)]
    if schedule == "official":
        per_epoch = steps_per_epoch * accum
        table = per_epoch * (total_steps // steps_per_epoch)
        first = (step % steps_per_epoch) * accum
        return [momentum_at(first + a, table, base) for a in range(accum)]
    raise ValueError(f"rcmae.momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")


def lr_at(step: int, warmup_steps: int, total_steps: int, peak: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup from 0, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class RCMAE(nn.Module):
    def __init__(self, student: MaskedAutoencoderViT, mask_ratio: float = 0.75, gamma: float = 1.0,
                 teacher_mask: str = "same"):
        super().__init__()
        if teacher_mask not in ("same", "different"):
            raise ValueError(f"rcmae.teacher_mask must be 'same' or 'different', got {teacher_mask!r}")
        self.student = student
        self.mask_ratio, self.gamma, self.teacher_mask = mask_ratio, gamma, teacher_mask
        self.teacher = None
        if gamma > 0:
            self.teacher = copy.deepcopy(student).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """``noise``: (N, L) masking noise, or (2, N, L) with the teacher's own in ``noise[1]``."""
        student_noise = noise[0] if noise.dim() == 3 else noise
        ids_keep, ids_restore, mask = random_masking_ids(student_noise, self.mask_ratio)
        pred = self.student(imgs, ids_keep, ids_restore).float()
        target = self.student.target(imgs).float()
        recon = masked_mean(((pred - target) ** 2).mean(dim=-1), mask)
        out = {"loss": recon, "recon": recon.detach(), "mask": mask, "pred": pred.detach()}
        if self.teacher is not None:
            if self.teacher_mask == "different":
                ids_keep, ids_restore, _ = random_masking_ids(noise[1], self.mask_ratio)
            with torch.no_grad():
                teacher_pred = self.teacher(imgs, ids_keep, ids_restore).float()
            consistency = masked_mean(((pred - teacher_pred) ** 2).mean(dim=-1), mask)
            out.update(loss=recon + self.gamma * consistency, consistency=consistency.detach(),
                       teacher_pred=teacher_pred)
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, one foreach kernel."""
        if self.teacher is None:
            return
        t = [p for p in self.teacher.parameters()]
        s = [p for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)
