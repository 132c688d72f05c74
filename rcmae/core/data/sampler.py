"""Sampling and seeding: every random choice is a function of (seed, epoch, index), so the augmentation
of a sample does not depend on the number of processes, data-loader workers, or where a run was resumed.

:class:`GlobalBatchSampler` streams training micro-batches from any optimizer step; :func:`shard_loader`
splits an evaluation set over processes without padding."""
from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int, torch_only: bool = False):
    """Seed torch's CPU generator, numpy and ``random`` (torchvision and timm augmentations draw from all
    three; with ``torch_only``, torch's alone, for transforms that draw nothing else) for the duration of
    the block, then restore the previous states. (``torch.default_generator`` directly: seeding through
    ``torch.manual_seed`` also reseeds every accelerator's generator and costs ~70x more.)"""
    torch_state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    if not torch_only:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if not torch_only:
            random.setstate(py_state)
            np.random.set_state(np_state)


class GlobalBatchSampler(Sampler):
    """Infinite stream of this rank's ``(index, seed)`` pairs, starting at optimizer step ``start_step``.

    Epoch ``e`` is a permutation seeded by (seed, e), cut into global batches of
    ``micro_batch * accum * world`` samples (the remainder is dropped). Within step ``s``, micro-batch
    ``m`` of rank ``r`` takes positions ``(m * world + r) * micro_batch`` onward: one process with
    ``accum = k`` sees exactly the samples of ``k`` processes with ``accum = 1``.
    """

    def __init__(self, num_samples: int, micro_batch: int, accum: int, world: int, rank: int,
                 seed: int, start_step: int = 0):
        self.micro_batch, self.accum, self.world, self.rank = micro_batch, accum, world, rank
        self.global_batch = micro_batch * accum * world
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} images cannot fill one batch of {self.global_batch}")
        self.num_samples, self.seed, self.start_step = num_samples, seed, start_step

    def __len__(self) -> int:  # one epoch for this rank
        return self.steps_per_epoch * self.accum * self.micro_batch

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
            for s in range(step_in_epoch, self.steps_per_epoch):
                for m in range(self.accum):
                    start = s * self.global_batch + (m * self.world + self.rank) * self.micro_batch
                    for i in perm[start:start + self.micro_batch]:
                        yield i, sample_seed(self.seed, epoch, i)
            step = (epoch + 1) * self.steps_per_epoch


class TimedIterator:
    """An iterator that adds up the seconds spent waiting for its items (the input pipeline's share of
    a training step); ``take_wait()`` returns and resets the sum."""

    def __init__(self, iterator):
        self.iterator, self.wait = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = next(self.iterator)
        self.wait += time.perf_counter() - t0
        return item

    def take_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait


def train_batches(dataset, micro_batch: int, accum: int, world: int, rank: int, seed: int,
                  start_step: int, num_workers: int, pin_memory: bool, collate_fn=None):
    """Endless iterator over this process's micro-batches from optimizer step ``start_step`` on (timed:
    see :class:`TimedIterator`)."""
    sampler = GlobalBatchSampler(len(dataset), micro_batch, accum, world, rank, seed, start_step)
    return TimedIterator(iter(DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                                         collate_fn=collate_fn)))


class ShardSampler(Sampler):
    """``(index, 0)`` pairs of indices ``rank, rank + world, ...``: an uneven split, no duplicates."""

    def __init__(self, num_samples: int, world: int, rank: int):
        self.indices = range(rank, num_samples, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return ((i, 0) for i in self.indices)


def shard_loader(dataset, batch_size: int, world: int, rank: int, num_workers: int, pin: bool):
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world, rank),
                      num_workers=num_workers, pin_memory=pin)
