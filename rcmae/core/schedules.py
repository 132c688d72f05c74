"""Per-iteration schedules: linear warmup + half-cycle cosine (lr), cosine from a base to 1 (momentum)."""
from __future__ import annotations

import math


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Entry ``step`` of a cosine from ``base`` (step 0) to 1 (step ``total_steps``)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


def lr_at(step: int, warmup_steps: int, total_steps: int, peak: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup from 0, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
