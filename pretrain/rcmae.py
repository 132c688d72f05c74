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
from timm.models.vision_transformer import VisionTransformer

from rcmae.core.checkpoint import FIXED_KEYS, WHICH, PretrainCheckpoint, encoder_arch, load_state
from rcmae.core.errors import CheckpointError, ConfigError
from rcmae.core.schedules import lr_at, momentum_at
from rcmae.core.vit import build_classifier, infer_arch, is_encoder_key
from rcmae.pretrain.models import MaskedAutoencoderViT, build_mae, masked_mean, random_masking_ids

MOMENTUM_SCHEDULES = ("cosine", "official")
TEACHER_MASKS = ("same", "different")  # the teacher sees the student's mask, or another one
METRICS = ("loss", "recon", "consistency")  # what RCMAE.forward reports each step


def official_micro_batches(num_samples: int, world: int, micro_batch: int) -> int:
    """Micro-batches per process and epoch in the official loop: its ``DistributedSampler`` pads the
    data to a multiple of the world size, its loader drops the partial last micro-batch (ImageNet-1k
    on 8 x 256: ceil(1,281,167 / 8) // 256 = 625)."""
    return -(-num_samples // world) // micro_batch


class StepSchedules:
    """The lr and the teacher's EMA momenta of each optimizer step (``rcmae.momentum_schedule``).

    ``cosine`` (ours): per-step lr (linear warmup, half-cycle cosine) over the optimizer steps; one EMA
    update after each optimizer step, momentum cosine from ``momentum`` to 1 over the run's steps.

    ``official`` (the official RC-MAE ``engine_pretrain.py``, which produced the paper's numbers)
    counts the ``micro_per_epoch`` micro-batches its loader yields (:func:`official_micro_batches`):
    the lr is set before micro-batch ``i = step_in_epoch x accum`` at epoch ``epoch + i /
    micro_per_epoch``; the teacher moves after *every* micro-batch ``i`` with entry ``i`` (the index
    within the epoch) of a cosine table of ``epochs x micro_per_epoch`` entries, so the momentum
    never leaves ~``momentum``, and under accumulation A it moves A times per optimizer step (A - 1
    times towards the not yet updated student). The micro-batches left after an epoch's last
    optimizer step (1 for ViT-B/L on ImageNet-1k: 625 = 312 x 2 + 1) run forward and backward there,
    and their gradient is discarded by the next epoch's ``zero_grad``: only their EMA updates change
    any weight, so those are all that is run here (:meth:`leftover_momenta`).
    """

    def __init__(self, kind: str, steps_per_epoch: int, epochs: int, accum: int, warmup_epochs: float,
                 peak_lr: float, min_lr: float, momentum: float, micro_per_epoch: int | None = None):
        if kind not in MOMENTUM_SCHEDULES:
            raise ConfigError(f"rcmae.momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {kind!r}")
        micro_per_epoch = steps_per_epoch * accum if micro_per_epoch is None else micro_per_epoch
        if kind == "official" and micro_per_epoch // accum != steps_per_epoch:
            raise ConfigError(f"the official loop would run {micro_per_epoch // accum} optimizer steps an epoch "
                              f"({micro_per_epoch} micro-batches of accumulation {accum}), this run "
                              f"{steps_per_epoch}: choose another micro-batch for rcmae.momentum_schedule=official")
        self.kind, self.steps_per_epoch, self.epochs, self.accum = kind, steps_per_epoch, epochs, accum
        self.warmup_epochs, self.peak_lr, self.min_lr, self.momentum = warmup_epochs, peak_lr, min_lr, momentum
        self.micro_per_epoch = micro_per_epoch
        # the time axis of the lr schedule: optimizer steps (ours) or the official loop's micro-batches
        self.ticks_per_epoch, self.ticks_per_step = ((micro_per_epoch, accum) if kind == "official"
                                                     else (steps_per_epoch, 1))

    @property
    def leftover(self) -> int:
        """Micro-batches per epoch after the last optimizer step (official only; 0 for ours)."""
        return self.micro_per_epoch - self.steps_per_epoch * self.accum if self.kind == "official" else 0

    def lr(self, step: int) -> float:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        ticks = self.ticks_per_epoch
        return lr_at(epoch * ticks + in_epoch * self.ticks_per_step, int(self.warmup_epochs * ticks),
                     self.epochs * ticks, self.peak_lr, self.min_lr)

    def momenta(self, step: int) -> list[float]:
        """Momenta of optimizer step ``step``'s EMA updates, in order (``TrainStep``'s ``update_args``:
        the last after the optimizer step, the others after micro-batches 0, 1, ...)."""
        if self.kind == "cosine":
            return [momentum_at(step, self.epochs * self.steps_per_epoch, self.momentum)]
        first = (step % self.steps_per_epoch) * self.accum
        return self.official_entries(first, first + self.accum)

    def leftover_momenta(self, step: int) -> list[float]:
        """Momenta of the EMA updates of the leftover micro-batches that follow step ``step`` (the
        last of an epoch, official only); empty otherwise."""
        if self.leftover == 0 or (step + 1) % self.steps_per_epoch:
            return []
        return self.official_entries(self.steps_per_epoch * self.accum, self.micro_per_epoch)

    def official_entries(self, start: int, stop: int) -> list[float]:
        table = self.epochs * self.micro_per_epoch  # the official table's length; indexed within the epoch
        return [momentum_at(i, table, self.momentum) for i in range(start, stop)]


class RCMAE(nn.Module):
    def __init__(self, student: MaskedAutoencoderViT, mask_ratio: float = 0.75, gamma: float = 1.0,
                 teacher_mask: str = "same"):
        super().__init__()
        if teacher_mask not in TEACHER_MASKS:
            raise ValueError(f"rcmae.teacher_mask must be one of {TEACHER_MASKS}, got {teacher_mask!r}")
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

    def encoder(self, which: str = "auto") -> VisionTransformer:
        """A copy of the teacher's encoder (``auto``: when there is one, else the student's) as timm's
        ``VisionTransformer`` without head, class-token pooling: what k-NN and the feature pictures read."""
        if which == "auto":
            which = "student" if self.teacher is None else "teacher"
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        source = getattr(self, which)
        if source is None:
            raise CheckpointError("this MAE has no teacher: use which=student (or auto)")
        weights = {k: v for k, v in source.state_dict().items() if is_encoder_key(k)}
        vit = build_classifier(*encoder_arch(weights, f"the {which}"), num_classes=0, global_pool="token")
        vit.load_state_dict(weights)
        return vit

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


def mask_noise(seed: int, step: int, global_batch: int, num_patches: int, device: torch.device,
               different_teacher_mask: bool) -> torch.Tensor:
    """Masking noise of a whole optimizer step, a function of (seed, step) only.

    Shape (G, L), or (2, G, L) with the teacher's own noise second. Each process slices its
    micro-batches out of it, so the masks do not depend on the number of processes.
    """
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    shape = (2, global_batch, num_patches) if different_teacher_mask else (global_batch, num_patches)
    return torch.rand(shape, generator=g, device=device)
