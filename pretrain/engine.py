"""The training step shared by the training loop and the throughput benchmark."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


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


def training_forward(module: nn.Module, world_size: int, device: torch.device, compile: bool) -> nn.Module:
    """What the step calls: ``module`` under DDP when there are several processes, then compiled
    on request (``torch.compile``)."""
    forward = module
    if world_size > 1:
        forward = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile else forward


class TrainStep:
    """One optimizer step: ``accum`` micro-batches forward/backward (DDP syncs on the last only),
    optional gradient clipping, optimizer step (through the fp16 scaler when given), then
    ``after_step(m)`` for each of ``momenta`` (RC-MAE: the EMA update of the teacher): the last
    after the optimizer step, any others after micro-batches 0, 1, ... (the official RC-MAE
    schedule updates the teacher after every micro-batch).

    ``forward(*inputs)`` returns a dict with the ``loss`` to minimise and detached metrics. Each
    group's lr is ``lr * group.get("lr_scale", 1)`` (layer-wise decay). Returns device tensors
    summed over micro-batches; nothing here synchronises with the host.
    """

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                 amp_dtype: torch.dtype | None, device: torch.device, clip_grad: float | None = None,
                 scaler: torch.amp.GradScaler | None = None, after_step=None,
                 metric_keys=("loss", "recon", "consistency")):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.amp_dtype, self.device, self.clip_grad, self.scaler = amp_dtype, device, clip_grad, scaler
        self.after_step = after_step if after_step is not None else getattr(model, "update_teacher", None)
        self.metric_keys = metric_keys

    def __call__(self, micro_batches: list[tuple[torch.Tensor, ...]], lr: float,
                 momenta: tuple[float, ...] | list[float] = ()) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        accum = len(micro_batches)
        if len(momenta) > accum:
            raise ValueError(f"{len(momenta)} teacher updates for {accum} micro-batches")
        between = momenta[:-1]  # updates after micro-batches, before the optimizer step
        sums = {}
        for i, inputs in enumerate(micro_batches):
            sync = i == accum - 1 or not hasattr(self.forward, "no_sync")
            with (contextlib.nullcontext() if sync else self.forward.no_sync()), \
                    torch.autocast(self.device.type, dtype=self.amp_dtype,
                                   enabled=self.amp_dtype is not None):
                out = self.forward(*inputs)
            loss = out["loss"] / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for key in self.metric_keys:
                if key in out:
                    value = out[key].detach()
                    sums[key] = sums[key] + value if key in sums else value
            if i < len(between) and self.after_step is not None:
                self.after_step(between[i])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if momenta and self.after_step is not None:
            self.after_step(momenta[-1])
        return sums
