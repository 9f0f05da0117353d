"""The torch DataLoader :class:`~dyrep_ray.engine.protocols.DataSource`: map-style datasets, one sampler per rank.

Used by ``--local`` and by Ray Train workers for every dataset but Ray Data-streamed Parquet (see
:mod:`dyrep_ray.distributed.ray_data`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..data import AUG_KEYS, build_datasets
from .config import TrainConfig
from .global_batch import (
    GlobalBatchSampler,
    SampleKeyedDataset,
    epoch_order,
    micro_batch_size,
    step_size,
)
from .global_batch import steps_per_epoch as global_steps_per_epoch
from .protocols import Batch, TrainContext

# Offset separating the BN-recalibration sampler seeds from the training sampler's.
RECAL_SEED_OFFSET = 100_003
PARQUET = "parquet"


def aug_options(cfg: TrainConfig) -> dict[str, Any]:
    """The augmentation/normalization options the datasets are built with (train loop, eval, convert, preflight)."""
    return {k: getattr(cfg, k) for k in AUG_KEYS}


def build_map_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) as map-style datasets; Parquet shards are read with pyarrow (no Ray)."""
    aug = aug_options(cfg)
    if cfg.dataset != PARQUET:
        return build_datasets(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed,
                              synthetic_train_size=cfg.synthetic_train_size,
                              synthetic_val_size=cfg.synthetic_val_size, aug=aug)
    from ..data.parquet import ParquetImageDataset, read_parquet_metadata, resolve_parquet_splits, sample_transform

    # The CLI resolved them already; a library caller gets the same rules (validation never on the train shards).
    splits = resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val)
    train_path, val_path = splits["parquet_train"], splits["parquet_val"]
    source = read_parquet_metadata(train_path)
    train = ParquetImageDataset(train_path, sample_transform(
        source["dataset"], train=True, image_size=cfg.image_size, aug=aug))
    val = ParquetImageDataset(val_path, sample_transform(
        source["dataset"], train=False, image_size=cfg.image_size, aug=aug))
    return train, val, int(source["num_classes"])


def _len(dataset: Dataset) -> int:
    return len(cast(Sized, dataset))  # every dataset dyrep-ray builds is map-style and sized


@dataclass(frozen=True)
class MicroBatch:
    """Micro-batch ``index`` (within its step) of a global batch: its images, targets and sample ids."""

    index: int
    images: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class GlobalStep:
    """This rank's part of global step ``step`` (``size`` samples over all ranks)."""

    step: int
    size: int
    micros: list[MicroBatch]


@dataclass(frozen=True)
class EpochPosition:
    """Where a mid-epoch checkpoint left an epoch: ``step`` steps done on each of ``world_size`` ranks, which
    consumed the first ``samples`` entries of the epoch's (padded) sample order across all ranks."""

    step: int
    samples: int
    world_size: int


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way, without loading the samples it skips.

    The epoch's order is the parent's (a seeded permutation, padded to a multiple of the world size, dealt
    round-robin to the ranks), so rank ``r``'s first ``k`` samples are the order's positions ``r, r+W, ...``
    below ``k * W``.  Resuming with the same world size ``W`` continues at position ``samples + r`` with stride
    ``W``: exactly the samples the uninterrupted epoch would still have given this rank.  With another world
    size (an elastic resize) the not yet consumed part of the permutation is dealt to the new ranks.
    The position applies to the next ``__iter__`` only (one resumed epoch).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position: EpochPosition | None = None

    def _order(self) -> list[int]:
        n = _len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def _remaining(self) -> list[int]:
        order = self._order()
        position = self.position
        if position is None:
            return []
        if position.world_size == self.num_replicas:
            total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
            padded = (order * math.ceil(total / max(len(order), 1)))[:total]
            return padded[position.samples + self.rank::self.num_replicas]
        rest = order[min(position.samples, len(order)):]
        total = math.ceil(len(rest) / self.num_replicas) * self.num_replicas
        padded = (rest * math.ceil(total / max(len(rest), 1)))[:total] if rest else []
        return padded[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.position is None:
            return super().__iter__()
        return iter(self._remaining())

    def __len__(self) -> int:
        return super().__len__() if self.position is None else len(self._remaining())


class TorchDataSource:
    """DataLoaders over map-style datasets: a ``DistributedSampler`` for training, a strided val split."""

    def __init__(self, cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, num_classes: int, *, rank: int,
                 world_size: int, pin_memory: bool = False) -> None:
        self.cfg, self.train_ds, self.val_ds, self.num_classes = cfg, train_ds, val_ds, num_classes
        self.rank, self.world_size = rank, world_size
        self.train_sampler = ResumableDistributedSampler(
            train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
        # Its own generator (reseeded per epoch): creating the epoch's iterator draws from it, not from the
        # global RNG, so a resumed epoch's augmentation randomness lines up with the uninterrupted one.
        self.loader_generator = torch.Generator()
        self.train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       num_workers=cfg.num_data_workers, pin_memory=pin_memory, drop_last=False,
                                       persistent_workers=cfg.num_data_workers > 0,
                                       generator=self.loader_generator)
        self.global_sampler: GlobalBatchSampler | None = None
        if cfg.global_batch_size is not None:  # the step's data depends on the step alone (global_batch)
            self.micro = micro_batch_size(cfg.global_batch_size, cfg.micro_batch_size)
            self.global_sampler = GlobalBatchSampler(_len(train_ds), cfg.global_batch_size, self.micro,
                                                     seed=cfg.seed, rank=rank, world_size=world_size)
            self.train_loader = DataLoader(SampleKeyedDataset(train_ds, cfg.seed), batch_sampler=self.global_sampler,
                                           num_workers=cfg.num_data_workers, pin_memory=pin_memory,
                                           persistent_workers=cfg.num_data_workers > 0)
        val_indices = list(range(rank, _len(val_ds), world_size))  # no padding: exact metrics
        self.val_loader = DataLoader(Subset(val_ds, val_indices), batch_size=cfg.val_batch_size or cfg.batch_size,
                                     shuffle=False, num_workers=cfg.num_data_workers, pin_memory=pin_memory)

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: TrainContext) -> TorchDataSource:
        train_ds, val_ds, num_classes = build_map_datasets(cfg)
        return cls(cfg, train_ds, val_ds, num_classes, rank=ctx.rank, world_size=ctx.world_size,
                   pin_memory=ctx.device.type == "cuda")

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a whole epoch (also while a resumed epoch is shorter)."""
        if self.cfg.global_batch_size is not None:
            return global_steps_per_epoch(_len(self.train_ds), self.cfg.global_batch_size)
        return math.ceil(math.ceil(_len(self.train_ds) / self.world_size) / self.cfg.batch_size)

    @property
    def sizes(self) -> tuple[int, int]:
        return _len(self.train_ds), _len(self.val_ds)

    def global_steps(self, epoch: int, start_step: int = 0) -> Iterator[GlobalStep]:
        """With ``global_batch_size``: this rank's part of every step of the epoch from ``start_step`` on (no
        sample of an earlier step is loaded); a step may give this rank no micro-batch (more ranks than it has)."""
        sampler = self.global_sampler
        assert sampler is not None, "global_steps needs global_batch_size"
        sampler.set_epoch(epoch, start_step)
        plan = sampler.plan()
        loaded = iter(self.train_loader)
        n = _len(self.train_ds)
        for step, micros in plan:
            parts = []
            for j, _ in micros:
                images, targets, ids = next(loaded)
                parts.append(MicroBatch(j, images, targets, ids))
            yield GlobalStep(step, step_size(n, step, sampler.global_batch_size), parts)

    def train_batches(self, epoch: int, position: EpochPosition | None = None) -> DataLoader:
        """The epoch's batches; from ``position`` on (no skipped sample is loaded) when resuming mid-epoch."""
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.position = position
        self.loader_generator.manual_seed(self.cfg.seed + epoch)
        return self.train_loader

    def val_batches(self) -> DataLoader:
        return self.val_loader

    def recal_batches(self, salt: int) -> Iterator[torch.Tensor]:
        if self.cfg.global_batch_size is not None:
            # the same batches on every rank and at every world size (rank 0's recalibration is kept)
            keyed = SampleKeyedDataset(self.train_ds, self.cfg.seed)
            order = epoch_order(_len(self.train_ds), self.cfg.seed + RECAL_SEED_OFFSET * (salt + 1), 0)
            for i in range(0, len(order), self.micro):
                items = [keyed[(-1 - salt, index)] for index in order[i:i + self.micro]]
                yield torch.stack([item[0] for item in items])
            return
        sampler: DistributedSampler[int] = DistributedSampler(
            self.train_ds, num_replicas=self.world_size, rank=self.rank, shuffle=True,
            seed=self.cfg.seed + RECAL_SEED_OFFSET * (salt + 1))
        loader = DataLoader(self.train_ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=0)
        for images, _ in loader:
            yield images


def torch_data_source(cfg: TrainConfig, ctx: TrainContext) -> TorchDataSource:
    """The default :data:`~dyrep_ray.engine.protocols.DataFactory`."""
    return TorchDataSource.from_config(cfg, ctx)


__all__ = ["Batch", "EpochPosition", "GlobalStep", "MicroBatch", "ResumableDistributedSampler", "TorchDataSource",
           "aug_options", "build_map_datasets", "torch_data_source"]
