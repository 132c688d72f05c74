"""Exact evaluation under DDP: every image counted once (no sampler padding), counts all-reduced."""
from __future__ import annotations

import torch

from rcmae.core.distributed import all_reduce, world_rank
from rcmae.core.progress import progress as progress_bar


def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None,
             class_mask: torch.Tensor | None = None, progress: str | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) over this process's shard, summed over all processes.

    ``class_mask`` (bool, num_classes) restricts the logits to a class subset before the argmax.
    Unreadable images (label -1) are counted apart, never as predictions. ``progress``: the label
    of a progress bar (shown on the main process only).
    """
    return evaluate_heads(model, loader, device, amp_dtype, class_mask, progress)[0]


@torch.no_grad()
def evaluate_heads(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None,
                   class_mask: torch.Tensor | None = None, progress: str | None = None, heads: int = 1) -> list[dict]:
    """:func:`evaluate` for a model with ``heads`` heads, whose logits come stacked (heads, batch, classes)
    (one head: (batch, classes)); one result per head, from one pass over the data."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(heads, 4, dtype=torch.float64, device=device)  # per head: top1, top5, n, unreadable
    bar = progress_bar(iterable=loader, desc=progress, unit="batch", leave=False,
                       disable=progress is None or world_rank() != 0)
    for imgs, labels, _ in bar:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(imgs).float()
        logits = logits if logits.ndim == 3 else logits[None]
        if class_mask is not None:
            logits = logits.masked_fill(~class_mask.to(device), float("-inf"))
        valid = labels >= 0
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = (top == labels[:, None]) & valid[:, None]
        counts += torch.stack([hit[..., 0].sum(-1), hit.any(-1).sum(-1), valid.sum().expand(heads),
                               (~valid).sum().expand(heads)], dim=1).double()
    model.train(was_training)
    return [{"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "n": int(n),
             "correct1": int(top1), "correct5": int(top5), "unreadable": int(unreadable)}
            for top1, top5, n, unreadable in all_reduce(counts).tolist()]
