"""RC-MAE: an MAE student plus an EMA ("mean") teacher that sees the same masked input.

loss = recon + gamma * consistency, where
  recon       = MSE(student prediction, pixel target), mean over pixels, then over masked patches;
  consistency = MSE(student prediction, teacher prediction), same averaging, teacher detached.
gamma = 0 builds no teacher: plain MAE at MAE's cost.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rcmae.core.checkpoint import FIXED_KEYS, PretrainCheckpoint, load_state
from rcmae.core.schedules import momentum_at
from rcmae.core.vit import infer_arch
from rcmae.pretrain.models import MaskedAutoencoderViT, build_mae, masked_mean, random_masking_ids

MOMENTUM_SCHEDULES = ("cosine", "official")
METRICS = ("loss", "recon", "consistency")  # what RCMAE.forward reports each step


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
        recon = self.student.reconstruction_loss(pred, imgs, mask)
        # recon / consistency keep their graphs for the gradient probe (pretrain/probe.py); TrainStep detaches them
        out = {"loss": recon, "recon": recon, "mask": mask, "pred": pred.detach()}
        if self.teacher is not None:
            if self.teacher_mask == "different":
                ids_keep, ids_restore, _ = random_masking_ids(noise[1], self.mask_ratio)
            with torch.no_grad():
                teacher_pred = self.teacher(imgs, ids_keep, ids_restore).float()
            consistency = masked_mean(((pred - teacher_pred) ** 2).mean(dim=-1), mask)
            out.update(loss=recon + self.gamma * consistency, consistency=consistency, teacher_pred=teacher_pred)
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, one foreach kernel."""
        if self.teacher is None:
            return
        t = [p for p in self.teacher.parameters()]
        s = [p for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)


def rcmae_from_checkpoint(ckpt: PretrainCheckpoint) -> RCMAE:
    """The RCMAE of a pretraining checkpoint (ours, official MAE "full", official RC-MAE): the MAE
    student, and the EMA teacher when the file has one, loaded strictly."""
    sd = ckpt.student
    arch, img_size = infer_arch(sd, ckpt.path)
    cfg = ckpt.raw.get("config") or {}
    m = cfg.get("model", {})
    dim = sd["decoder_embed.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks."))
    # the official decoders use 32-dimensional heads (512-d: 16 heads, ViT-S's 256-d: 8)
    student = build_mae(arch, img_size, dim, depth, m.get("decoder_heads", max(1, dim // 32)),
                        m.get("norm_pix_loss", True))
    model = RCMAE(student, m.get("mask_ratio", 0.75), gamma=1.0 if ckpt.teacher is not None else 0.0,
                  teacher_mask=cfg.get("rcmae", {}).get("teacher_mask", "same"))
    load_state(model.student, sd, f"{ckpt.path} student", recompute=FIXED_KEYS)
    if ckpt.teacher is not None:
        load_state(model.teacher, ckpt.teacher, f"{ckpt.path} teacher", recompute=FIXED_KEYS)
    return model


TOKEN_NAMES = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = True):
    """AdamW groups of the official MAE / RC-MAE (timm 0.3.2 ``add_weight_decay``): no decay on
    biases and 1-d tensors (norms); the tokens are decayed. ``decay_tokens=False`` also exempts
    tokens and position embeddings (ours are fixed sin-cos, so only ``cls_token`` and ``mask_token``
    change).

    Returns the groups and the parameter names in the optimizer's order (saved in checkpoints;
    with ``decay_tokens`` it is the official optimizer's order).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or (
            not decay_tokens and name.split(".")[-1] in TOKEN_NAMES)
        (no_decay if skip else decay).append((name, p))
    groups = [{"params": [p for _, p in no_decay], "weight_decay": 0.0},
              {"params": [p for _, p in decay], "weight_decay": weight_decay}]
    return groups, [n for n, _ in no_decay] + [n for n, _ in decay]


def build_optimizer(student: nn.Module, weight_decay: float, betas, device_type: str,
                    decay_tokens: bool = True):
    groups, names = param_groups(student, weight_decay, decay_tokens)
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), **fast), names


def mask_noise(seed: int, step: int, global_batch: int, num_patches: int, device: torch.device,
               different_teacher_mask: bool) -> torch.Tensor:
    """Masking noise of a whole optimizer step, a function of (seed, step) only.

    Shape (G, L), or (2, G, L) with the teacher's own noise second. Each process slices its
    micro-batches out of it, so the masks do not depend on the number of processes.
    """
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    shape = (2, global_batch, num_patches) if different_teacher_mask else (global_batch, num_patches)
    return torch.rand(shape, generator=g, device=device)


