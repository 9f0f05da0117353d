"""Parquet shards through Ray Data: the dataset reader, the batch decoder, and the Ray Data ``DataSource``.

The writer side and the pyarrow-only reader (:class:`~dyrep_ray.data.parquet.ParquetImageDataset`, used by
``--local``) stay in :mod:`dyrep_ray.data.parquet`; this module is the Ray adapter.  :func:`read_parquet_dataset`
returns a ``ray.data.Dataset``; :class:`BatchDecoder` turns a numpy batch dict into
``(images NCHW float32, labels int64)``; :func:`iter_decoded_batches` runs it as the ``collate_fn`` of
``iter_torch_batches``, e.g. in a Ray Train worker::

    shard = ray.train.get_dataset_shard("train")
    decoder = build_batch_decoder("cifar10", train=True)
    for images, labels in iter_decoded_batches(shard, decoder, batch_size=128):
        ...
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ray.data
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from ..data.builder import DEFAULT_IMAGE_SIZE
from ..data.errors import DatasetError
from ..data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    _parquet_files,
    decode_image,
    parquet_row_count,
    read_parquet_metadata,
    sample_transform,
)
from ..engine.config import TrainConfig
from ..engine.data_source import EpochPosition, aug_options
from ..engine.protocols import Batch

TRAIN, VAL = "train", "val"
#: Rows of local shuffle buffer per row of batch (Ray Data shards are shuffled within a window, not globally).
SHUFFLE_BUFFER_BATCHES = 4


def read_parquet_dataset(path: str | os.PathLike | Sequence[str], **read_kwargs: Any) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` over the shards at ``path`` (a shard, a directory of shards, or a list)."""
    if isinstance(path, (str, os.PathLike)):
        paths: Any = [str(file) for file in _parquet_files(path)]
    else:
        paths = [str(file) for file in path]
    return ray.data.read_parquet(paths, **read_kwargs)


def parquet_datasets(cfg: TrainConfig) -> dict[str, ray.data.Dataset]:
    """The ``datasets`` a ``TorchTrainer`` streams to its workers for ``dataset: parquet``."""
    return {TRAIN: read_parquet_dataset(cfg.parquet_train), VAL: read_parquet_dataset(cfg.parquet_val or
                                                                                     cfg.parquet_train)}


class BatchDecoder:
    """Numpy batch dict ``{"image": bytes[N], "label": int[N]}`` -> ``(float32 NCHW, int64 N)`` tensors.

    Applies ``transform`` (PIL image -> CHW tensor, including any augmentation) per image. Picklable, so it
    can be shipped to Ray workers and passed as ``collate_fn`` to ``iter_torch_batches``.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            encoded, labels = batch[IMAGE_COLUMN], batch[LABEL_COLUMN]
        except KeyError as exc:
            raise DatasetError(
                f"batch lacks column {exc}; expected columns {IMAGE_COLUMN!r} and {LABEL_COLUMN!r}"
            ) from None
        images = torch.stack([self.transform(decode_image(bytes(item))) for item in encoded])
        return images, torch.tensor(np.asarray(labels), dtype=torch.int64)

    def as_ray_collate_fn(self) -> NumpyBatchDecoder:
        """This decoder as a ``ray.data.collate_fn.NumpyBatchCollateFn``."""
        return NumpyBatchDecoder(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class NumpyBatchDecoder(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: numpy batch dict -> ``(images, labels)`` via a decoder."""

    def __init__(self, decoder: Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.decoder = decoder

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(batch)


def build_batch_decoder(
    dataset: str, *, train: bool, image_size: int = DEFAULT_IMAGE_SIZE, aug: Mapping[str, Any] | None = None
) -> BatchDecoder:
    """A :class:`BatchDecoder` with the same normalization/augmentation as the in-memory dataset."""
    return BatchDecoder(sample_transform(dataset, train=train, image_size=image_size, aug=aug))


def iter_decoded_batches(
    data: Any,
    decoder: BatchDecoder,
    *,
    batch_size: int,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate ``(images, labels)`` over a ``ray.data.Dataset`` or a ``DataIterator`` (``get_dataset_shard``)."""
    yield from data.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=decoder.as_ray_collate_fn(),
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
    )


class RayDataSource:
    """This worker's Ray Data shards of the Parquet train/val datasets given to the ``TorchTrainer``.

    Shards cannot be re-read out of step, so BN recalibration uses the epoch's last training batches.
    """

    def __init__(self, cfg: TrainConfig, train_shard: Any, val_shard: Any, *, world_size: int) -> None:
        meta = read_parquet_metadata(cfg.parquet_train)
        self.cfg, self.world_size = cfg, world_size
        self.num_classes = int(meta["num_classes"])
        self.train_shard, self.val_shard = train_shard, val_shard
        aug = aug_options(cfg)
        self.decoders = {split: build_batch_decoder(meta["dataset"], train=split == TRAIN,
                                                    image_size=cfg.image_size, aug=aug) for split in (TRAIN, VAL)}
        self.train_rows = parquet_row_count(cfg.parquet_train)
        self.val_rows = parquet_row_count(cfg.parquet_val or cfg.parquet_train)
        self._recent_images: deque[torch.Tensor] = deque(maxlen=cfg.dyrep_recal_bn_iters)

    @classmethod
    def from_ray_train(cls, cfg: TrainConfig, ctx: Any) -> RayDataSource:
        """The shards Ray Train hands this worker (a missing one is an error: the launcher gives both)."""
        import ray.train

        return cls(cfg, ray.train.get_dataset_shard(TRAIN), ray.train.get_dataset_shard(VAL),
                   world_size=ctx.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(self.train_rows / self.world_size / self.cfg.batch_size), 1)

    @property
    def sizes(self) -> tuple[int, int]:
        return self.train_rows, self.val_rows

    def train_batches(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        """The shard's batches of ``epoch``.  Resuming mid-epoch (``position``), the first ``position.step``
        batches are read and dropped: the epoch keeps its step count and LR positions, but which rows they
        were is not reproduced (Ray Data's streaming split hands blocks to workers as they ask), so a Ray Data
        resume is exact in steps, not in data order."""
        batch_size = self.cfg.batch_size
        skip = position.step if position is not None else 0
        for index, (images, labels) in enumerate(iter_decoded_batches(
                self.train_shard, self.decoders[TRAIN], batch_size=batch_size,
                local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
                local_shuffle_seed=self.cfg.seed + epoch)):
            if index < skip:
                continue
            self._recent_images.append(images)
            yield images, labels

    def val_batches(self) -> Iterator[Batch]:
        return iter_decoded_batches(self.val_shard, self.decoders[VAL],
                                    batch_size=self.cfg.val_batch_size or self.cfg.batch_size)

    def recal_batches(self, salt: int) -> Iterator[torch.Tensor]:
        yield from list(self._recent_images)
