"""What the mean teacher does to the gradient of a real RC-MAE (the paper's Fig. 2 and 3(b)), measured.

The linear model (``linear_teacher.py``) shows it exactly: after an update Delta, the teacher lags the
student by D = alpha * Delta, and the consistency gradient is D X X^T / B, so on inputs similar to
the last ones it points the student back against Delta (a momentum regulariser conditioned on feature
similarity) and on unrelated inputs it vanishes. In a deep network the same holds to first order,
grad L_c ~ alpha J^T J Delta with J the Jacobian of the predictions on the current input. This module
measures, on any RC-MAE:

- :func:`loss_gradients`: grad L_r and grad L_c of the student, separately (one forward, two backward);
- :func:`gradient_stats`: cos(grad L_r, grad L_c), |grad L_c| / |grad L_r| and cos(-grad L_c, last
  update) (the direction the consistency term pushes vs the direction the last step moved: negative
  means it removes part of the previous update), for the whole student and per block;
- :class:`TrainingProbe`: the same every ``analysis.every_steps`` optimizer steps of a pretraining run;
- the controlled experiment built on these lives with the paper's analysis
  (:func:`rcmae.analysis.mean_teacher.update_experiment`).
"""
from __future__ import annotations

import re

import torch

from rcmae.core.engine import HookBase
from rcmae.core.geometry import cosine
from rcmae.pretrain.rcmae import RCMAE

STATS = ("cos_r_c", "ratio_c_r", "cos_c_update")


def block_of(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3``; ``decoder_pred.bias`` -> ``decoder_pred``."""
    m = re.match(r"((?:decoder_)?blocks\.\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def student_params(model: RCMAE) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.student.named_parameters() if p.requires_grad}


def loss_gradients(model: RCMAE, imgs: torch.Tensor, noise: torch.Tensor, amp_dtype=None):
    """grad L_r and grad L_c (the unweighted consistency loss) with respect to the student's
    parameters, as ``{name: tensor}`` (zeros where a loss does not reach a parameter)."""
    if model.teacher is None:
        raise ValueError("the consistency gradient needs a teacher: this is MAE (gamma = 0)")
    params = student_params(model)
    with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(imgs, noise)
    grads = []
    for key, retain in (("recon", True), ("consistency", False)):
        g = torch.autograd.grad(out[key], list(params.values()), retain_graph=retain, allow_unused=True)
        grads.append({n: torch.zeros_like(p) if gi is None else gi.float() for (n, p), gi in zip(params.items(), g)})
    return grads[0], grads[1]


def _stats(g_r: torch.Tensor, g_c: torch.Tensor, update: torch.Tensor | None) -> dict:
    norm_r = float(g_r.norm())
    out = {"cos_r_c": cosine(g_r, g_c), "ratio_c_r": float(g_c.norm()) / norm_r if norm_r else 0.0}
    if update is not None:
        out["cos_c_update"] = cosine(-g_c, update)
    return out


def gradient_stats(g_r: dict, g_c: dict, update: dict | None = None) -> dict:
    """The whole student's statistics (:data:`STATS`; ``cos_c_update`` only with the last
    ``update``, as ``{name: W_after - W_before}``) and ``blocks``: the same per block."""
    flat = lambda g, names: torch.cat([g[n].flatten() for n in names])  # noqa: E731
    names = list(g_r)
    by_block: dict[str, list[str]] = {}
    for n in names:
        by_block.setdefault(block_of(n), []).append(n)
    out = _stats(flat(g_r, names), flat(g_c, names), flat(update, names) if update else None)
    out["blocks"] = {b: _stats(flat(g_r, ns), flat(g_c, ns), flat(update, ns) if update else None)
                     for b, ns in by_block.items()}
    return out


class TrainingProbe(HookBase):
    """``analysis.every_steps`` in pretraining, as a hook: at every N-th optimizer step, before the step,
    the gradients of L_r and L_c on the step's first micro-batch at the current weights, with the
    previous optimizer update, written to the run's metrics (``probe_*``). The weights are copied only on
    the step before a probe; with the probe off (N = 0) none of this is built."""

    def __init__(self, model: RCMAE, every_steps: int, amp_dtype=None):
        self.model, self.every, self.amp_dtype = model, every_steps, amp_dtype
        self.weights_before: dict | None = None
        self.last_update: dict | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, step: int, imgs: torch.Tensor, noise: torch.Tensor) -> dict | None:
        """Call before optimizer step ``step``; returns the record of a probed step, else None."""
        record = None
        if self.due(step):
            g_r, g_c = loss_gradients(self.model, imgs, noise, self.amp_dtype)
            record = gradient_stats(g_r, g_c, self.last_update)
            self.last_update = None
        if self.due(step + 1):
            self.weights_before = {n: p.detach().clone() for n, p in student_params(self.model).items()}
        return record

    def before_step(self) -> None:  # the gradients at the weights the step starts from
        trainer = self.trainer
        record = self.measure(trainer.step, *trainer.inputs[0])
        if record:
            trainer.metrics.write({"step": trainer.step, "epoch": round(trainer.step / trainer.steps_per_epoch, 4),
                                   **{f"probe_{k}": v for k, v in record.items()}}, trainer.env.is_main)

    def after_step(self) -> None:
        if self.weights_before is not None:
            params = student_params(self.model)
            self.last_update = {n: params[n].detach() - w for n, w in self.weights_before.items()}
            self.weights_before = None
