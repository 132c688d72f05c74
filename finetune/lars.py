"""LARS as the official MAE linear probe runs it (MAE ``util/lars.py``, from MoCo v3).

timm's ``Lars`` scales an update by ``trust * |w| / (|g| + wd |w|)``; MAE's by ``trust * |w| / |g + wd w|``,
the norm of the decayed update itself. The two agree only without weight decay, so the probe uses this one.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each matrix's update ``u = g + weight_decay * w`` is scaled by
    ``trust_coefficient * |w| / |u|`` (left as is when either norm is 0); tensors of one dimension or
    fewer (biases, norms) get neither weight decay nor scaling. The momentum buffer is kept under timm's
    state name, ``momentum_buffer``, so probes checkpointed with timm's ``Lars`` resume."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

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
