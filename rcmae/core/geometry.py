"""Angles and length ratios of tensors taken as flat vectors (gradients, updates, weight matrices)."""
from __future__ import annotations

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos of the angle between ``a`` and ``b`` (Frobenius for matrices), 0 when either is exactly zero
    (no direction)."""
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a.flatten() @ b.flatten() / (na * nb))


def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a| / |b|, 0 where ``a`` is exactly zero."""
    na = a.norm()
    return 0.0 if na == 0 else float(na / b.norm())
