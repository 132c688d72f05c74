"""The optimizers of pretraining and fine-tuning / linear probing, their parameter groups, and LARS.

Contract with the training step (:class:`rcmae.core.engine.TrainStep`): each optimizer group may hold
``LR_SCALE`` (``"lr_scale"``); the step sets ``group["lr"] = lr * group.get(LR_SCALE, 1.0)`` from the
schedule's ``lr``. Only fine-tuning's layer-wise decay sets it; a group without it takes the plain lr.

Parameter order is part of the checkpoint format: checkpoints store each parameter's name in group
order (``optimizer_param_names``), and official MAE / RC-MAE optimizer states are mapped by the official
order. The builders keep the official orders:

* pretraining (timm 0.3.2 ``add_weight_decay`` as MAE's ``main_pretrain.py`` calls it): two groups,
  ``[no decay (wd 0), decay (wd)]``, each in ``named_parameters()`` order;
* fine-tuning (MAE ``util/lr_decay.param_groups_lrd``): one group per (layer, decay) in first-seen
  order, each in ``named_parameters()`` order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from rcmae.core.errors import ConfigError

LR_SCALE = "lr_scale"  # group key: the group's lr is the schedule's lr times this (default 1)
FINETUNE_OPTIMIZERS = ("adamw", "lars", "sgd")


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in group order (what a checkpoint records)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _adamw(groups: list[dict], betas, device_type: str) -> torch.optim.AdamW:
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), **fast)


# ---- pretraining ---------------------------------------------------------------------------------

def pretrain_param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = True):
    """The official MAE / RC-MAE AdamW groups (timm 0.3.2 ``add_weight_decay`` with an empty skip
    list): no decay on biases and 1-d tensors (norms); the tokens (``cls_token``, ``mask_token``) are
    decayed. ``decay_tokens=False`` also exempts ``model.no_weight_decay()`` (the tokens; the fixed
    sin-cos position embeddings are not trained anyway).

    Returns ``[no_decay, decay]`` and the parameter names in the optimizer's order (with
    ``decay_tokens`` the official optimizer's order, whatever ``weight_decay`` is).
    """
    skip = () if decay_tokens else tuple(model.no_weight_decay())
    # timm's helper gives timm 0.3.2's split and order, with two differences worked around here: at
    # weight_decay 0 it puts every parameter into one group in named_parameters() order (0.3.2 kept
    # [1-d and biases, the rest]: the official order, which restoring an official checkpoint needs),
    # and it drops an empty group (0.3.2 kept both). So split with a nonzero placeholder decay, then
    # set the real one on two fixed groups.
    split = {g["weight_decay"]: g["params"] for g in
             param_groups_weight_decay(model, 1.0, no_weight_decay_list=skip)}
    groups = [{"params": split.get(0.0, []), "weight_decay": 0.0},
              {"params": split.get(1.0, []), "weight_decay": weight_decay}]
    by_id = {id(p): n for n, p in model.named_parameters()}
    return groups, [by_id[id(p)] for g in groups for p in g["params"]]


def build_pretrain_optimizer(student: nn.Module, weight_decay: float, betas, device_type: str,
                             decay_tokens: bool = True):
    """AdamW over :func:`pretrain_param_groups` (lr 0: the training step sets it); returns the
    optimizer and its parameter names in group order."""
    groups, names = pretrain_param_groups(student, weight_decay, decay_tokens)
    return _adamw(groups, betas, device_type), names


# ---- fine-tuning and linear probing --------------------------------------------------------------

def layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit``: 0 for the embeddings, i + 1 for block i, depth + 1 for the
    rest (final ``norm``, ``fc_norm``, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """MAE's ``param_groups_lrd``: ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no weight
    decay on 1-d tensors and ``model.no_weight_decay()`` (pos_embed, cls_token); groups keyed by
    (layer, decay) in first-seen order.

    Not timm's ``param_groups_layer_decay``: it takes the layers from timm's
    ``VisionTransformer.group_matcher``, which puts the final ``norm`` (``global_pool=token``) into the
    last block's layer: lr scale ``layer_decay ** 1`` instead of MAE's 1, and its parameters join that
    block's no-decay group (another group order). With ``global_pool=avg`` the two agree.
    """
    depth, skip = len(model.blocks), model.no_weight_decay()
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_decay = layer_id(name, depth), p.ndim == 1 or name in skip
        group = groups.setdefault((layer, no_decay), {
            "params": [], LR_SCALE: layer_decay ** (depth + 1 - layer),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return list(groups.values())


def build_finetune_optimizer(model: nn.Module, o: dict, device_type: str) -> torch.optim.Optimizer:
    """From the ``optim`` config ``o``: ``adamw`` with MAE's layer-wise lr decay
    (:func:`layer_decay_param_groups`), ``lars`` (the linear probe: MAE's rule, :class:`LARS`) or
    ``sgd`` (no decay on 1-d tensors). The lr is 0: the training step sets it."""
    if o["name"] == "adamw":
        return _adamw(layer_decay_param_groups(model, o["weight_decay"], o["layer_decay"]), o["betas"], device_type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if o["name"] == "lars":  # MAE's probe: one group; LARS itself exempts 1-d tensors
        return LARS(trainable, lr=0.0, weight_decay=o["weight_decay"], momentum=o["momentum"])
    if o["name"] == "sgd":
        matrices = [p for p in trainable if p.ndim > 1]
        vectors = [p for p in trainable if p.ndim <= 1]
        return torch.optim.SGD([{"params": matrices, "weight_decay": o["weight_decay"]},
                                {"params": vectors, "weight_decay": 0.0}], lr=0.0, momentum=o["momentum"])
    raise ConfigError(f"optim.name must be {', '.join(FINETUNE_OPTIMIZERS[:-1])} or {FINETUNE_OPTIMIZERS[-1]}, "
                      f"got {o['name']!r}")


class LARS(torch.optim.Optimizer):
    """LARS as the official MAE linear probe runs it (MAE ``util/lars.py``, from MoCo v3).

    SGD with momentum where each matrix's update ``u = g + weight_decay * w`` is scaled by
    ``trust_coefficient * |w| / |u|`` (left as is when either norm is 0); tensors of one dimension or
    fewer (biases, norms) get neither weight decay nor scaling. The momentum buffer is kept under timm's
    state name, ``momentum_buffer``, so probes checkpointed with timm's ``Lars`` resume.

    Not timm's ``Lars``: it scales by ``trust * |w| / (|g| + wd |w|)``, MAE by the norm of the decayed
    update itself; the two agree only without weight decay.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * weight_norm / update_norm,
                                        torch.ones_like(weight_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss
