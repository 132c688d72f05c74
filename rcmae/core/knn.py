"""Weighted k-NN classification on frozen features (k=20, temperature 0.07, cosine similarity).

Features of each process's shard are gathered exactly (every image once, in dataset order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rcmae.core.data.sampler import shard_loader
from rcmae.core.distributed import world_size
from rcmae.core.errors import ConfigError

POOLS = ("cls", "mean")  # the class token, or the mean of the patch tokens


def check_knn(knn: dict, section: str = "knn") -> None:
    """The k-NN settings (``k``, ``temperature``, ``pool``), checked before a run writes anything."""
    if knn["pool"] not in POOLS:
        raise ConfigError(f"{section}.pool must be one of {POOLS}, got {knn['pool']!r}")
    if knn["k"] < 1:
        raise ConfigError(f"{section}.k must be 1 or more, got {knn['k']}")
    if not knn["temperature"] > 0:
        raise ConfigError(f"{section}.temperature must be positive, got {knn['temperature']}")


@torch.no_grad()
def extract_features(backbone, loader, device, amp_dtype=None, pool: str = "cls"):
    """L2-normalised features and labels of the loader's shard, with their dataset indices."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for imgs, y, _ in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            tokens = backbone.forward_features(imgs.to(device, non_blocking=True))
        f = tokens[:, 0] if pool == "cls" else tokens[:, backbone.num_prefix_tokens:].mean(1)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(y.to(device))
    backbone.train(was_training)
    sampler_indices = torch.tensor(list(loader.sampler.indices), device=device)
    return torch.cat(feats), torch.cat(labels), sampler_indices


def gather_in_order(feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
    """All processes' rows, each exactly once, sorted by dataset index (shards may be uneven)."""
    if world_size() == 1:
        order = indices.argsort()
        return feats[order], labels[order]
    n = torch.tensor([len(indices)], device=feats.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    pad = longest - len(indices)
    rows = torch.cat([feats, labels[:, None].float(), indices[:, None].float()], dim=1)
    rows = F.pad(rows, (0, 0, 0, pad))
    gathered = [torch.zeros_like(rows) for _ in sizes]
    dist.all_gather(gathered, rows)
    rows = torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])
    rows = rows[rows[:, -1].argsort()]
    return rows[:, :-2], rows[:, -2].long()


@torch.no_grad()
def knn_classify(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> dict:
    """Each neighbour votes for its class with weight exp(cos / T); top-1 / top-5 in %."""
    k = min(k, len(train_feats))
    top1 = top5 = 0
    valid_val = val_labels >= 0
    for start in range(0, len(val_feats), chunk):
        sim = val_feats[start:start + chunk] @ train_feats.T
        sim, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx].clamp(min=0), (sim / temperature).exp()
                           * (train_labels[idx] >= 0))
        pred = votes.topk(min(5, num_classes), dim=1).indices
        y = val_labels[start:start + chunk]
        ok = valid_val[start:start + chunk]
        top1 += ((pred[:, 0] == y) & ok).sum().item()
        top5 += ((pred == y[:, None]).any(1) & ok).sum().item()
    n = int(valid_val.sum())
    return {"knn_top1": 100.0 * top1 / max(n, 1), "knn_top5": 100.0 * top5 / max(n, 1), "knn_n": n}


def knn_evaluate(backbone, train_set, val_set, num_classes: int, device, amp_dtype, knn: dict,
                 world: int, rank: int, num_workers: int) -> dict:
    """Features of both sets (sharded, gathered exactly) and the weighted k-NN accuracy."""
    out = []
    for dataset in (train_set, val_set):
        loader = shard_loader(dataset, knn["batch_size"], world, rank, num_workers, device.type == "cuda")
        out.append(gather_in_order(*extract_features(backbone, loader, device, amp_dtype, knn["pool"])))
    (train_f, train_y), (val_f, val_y) = out
    return knn_classify(train_f, train_y, val_f, val_y, num_classes, knn["k"], knn["temperature"])
