"""The global batch (``global_batch_size``): the data of a step, whatever the worker count.

A step is the epoch's next ``global_batch_size`` entries of its sample order (one seeded permutation of the
training set per epoch; the epoch's last step may be shorter), cut into micro-batches of ``micro_batch_size``
numbered 0, 1, ... within the step.  Micro-batch ``j`` goes to rank ``j % world_size``.  So what a step
computes on depends on the step index alone: a resize (or a restart at another world size) only changes
which rank computes which micro-batch, and a mid-epoch position is one number, the step.

Randomness is keyed by the sample, not by the rank: :class:`SampleKeyedDataset` seeds torch's and Python's
RNG from ``(seed, epoch, sample index)`` around each ``__getitem__`` (augmentation), and the loop seeds the
RNG from ``(seed, epoch, step, micro-batch)`` before each micro-batch's forward (dropout).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import Dataset, Sampler

#: micro-batches per global batch that the default micro_batch_size aims at: worlds 1, 2, 4 and 8 get equal
#: shares; other worlds differ by at most one micro-batch per rank.
DEFAULT_MICRO_BATCHES = 8


def micro_batch_size(global_batch_size: int, configured: int | None) -> int:
    """``micro_batch_size`` as configured, else ``global_batch_size / gcd(global_batch_size, 8)``."""
    if configured is not None:
        return configured
    return global_batch_size // math.gcd(global_batch_size, DEFAULT_MICRO_BATCHES)


def steps_per_epoch(n_samples: int, global_batch_size: int) -> int:
    return math.ceil(n_samples / global_batch_size)


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order (the permutation ``DistributedSampler(shuffle=True)`` draws)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n_samples, generator=g).tolist()


def step_micro_batches(order: list[int], step: int, global_batch_size: int, micro: int) -> list[list[int]]:
    """Step ``step``'s micro-batches (sample indices), in micro-batch order."""
    batch = order[step * global_batch_size:(step + 1) * global_batch_size]
    return [batch[i:i + micro] for i in range(0, len(batch), micro)]


def rank_micro_indices(n_micro: int, rank: int, world_size: int) -> list[int]:
    """The micro-batches (indices within the step) rank ``rank`` of ``world_size`` computes."""
    return list(range(rank, n_micro, world_size))


def step_size(n_samples: int, step: int, global_batch_size: int) -> int:
    """Samples in step ``step`` (the global batch; the epoch's last may be short)."""
    return max(0, min(global_batch_size, n_samples - step * global_batch_size))


def rng_key(*parts: int) -> int:
    """A 63-bit seed from integers (crc32 of each part: stable across processes and Python versions)."""
    key = 0
    for part in parts:
        key = (key * 1_000_003 + zlib.crc32(str(int(part)).encode())) % (2**63 - 1)
    return key


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler of one rank: its micro-batches of every step from ``start_step`` on, step by step.

    Yields lists of ``(epoch, sample index)`` (the epoch travels with the index so that DataLoader worker
    processes key the augmentation by it); :attr:`counts` is how many micro-batches each step gives this rank.
    """

    def __init__(self, n_samples: int, global_batch_size: int, micro: int, *, seed: int, rank: int,
                 world_size: int) -> None:
        self.n, self.global_batch_size, self.micro = n_samples, global_batch_size, micro
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def plan(self) -> list[tuple[int, list[tuple[int, list[int]]]]]:
        """``[(step, [(micro index, sample indices), ...]), ...]`` of this rank from ``start_step`` on."""
        order = epoch_order(self.n, self.seed, self.epoch)
        out = []
        for step in range(self.start_step, steps_per_epoch(self.n, self.global_batch_size)):
            micros = step_micro_batches(order, step, self.global_batch_size, self.micro)
            out.append((step, [(j, micros[j]) for j in rank_micro_indices(len(micros), self.rank,
                                                                           self.world_size)]))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _, micros in self.plan():
            for _, indices in micros:
                yield [(self.epoch, i) for i in indices]

    def __len__(self) -> int:
        return sum(len(m) for _, m in self.plan())


class SampleKeyedDataset(Dataset):
    """A map-style dataset indexed by ``(epoch, index)``: its augmentation draws are a function of
    ``(seed, epoch, index)`` (torch's and Python's RNG seeded around the item, then restored), never of the
    rank or of what the process drew before.  Items are ``(image, target, index)``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, int]:
        epoch, index = key
        seed = rng_key(self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                image, target = self.dataset[index]
            finally:
                random.setstate(py_state)
        return image, target, index


__all__ = ["DEFAULT_MICRO_BATCHES", "GlobalBatchSampler", "SampleKeyedDataset", "epoch_order",
           "micro_batch_size", "rank_micro_indices", "rng_key", "step_micro_batches", "step_size",
           "steps_per_epoch"]
