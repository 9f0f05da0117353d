"""Parquet shards through Ray Data: the dataset reader, decode + augmentation on CPU workers, the ``DataSource``.

The writer side and the pyarrow-only reader (:class:`~dyrep_ray.data.parquet.ParquetImageDataset`, used by
``--local``) stay in :mod:`dyrep_ray.data.parquet`; this module is the Ray adapter.

Training path (``dataset: parquet`` under Ray Train): :func:`decoded_dataset` adds
``map_batches`` (a :class:`DecodeAugment` per process) to :func:`read_parquet_dataset`, so PNG/JPEG decode and
the per-image transform (the same :func:`~dyrep_ray.data.parquet.sample_transform` objects ``--local`` uses, cut
by :func:`~dyrep_ray.data.parquet.split_transform`) run in Ray tasks, streamed.  Tasks rather than an actor pool:
Ray Data fuses them with the Parquet read (one task reads and decodes a block, so reads cannot starve behind
decode actors holding every CPU), and they run in Ray's pooled worker processes, so a new epoch's pipeline starts
no process (an actor pool would start, and import torch in, a new one per epoch).  Train
workers receive ready batches: **uint8 CHW** when the transform has no step after ``Normalize`` (eval always;
train without Cutout / random erasing) -- a quarter of float32's bytes through the object store -- and the
worker's :class:`ReadyBatchCollate` normalizes them with exactly ``ToTensor`` + ``Normalize``'s float32 ops
(bitwise equal to ``--local``); **float32 normalized** when Cutout / random erasing are on, because those steps
work on normalized values and draw random numbers that must be seeded in the decode actor.

Train augmentation is seeded per row and epoch (:func:`~dyrep_ray.data.parquet.sample_seed`: ``cfg.seed``,
epoch, CRC-32 of the row's bytes, its label), so a rerun draws the same crops/flips and every epoch differs.
The epoch is only known in the train workers, so the train pipeline is built per epoch there: rank 0 builds it
and ``streaming_split``\ s it (equal row counts, as Ray Train's own split), every rank gets its split.

:class:`BatchDecoder` / :func:`iter_decoded_batches` are the consumer-side decode (the train worker decodes
every PNG itself): kept for callers and as the benchmark's baseline (``bench/data_path.py``).
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ray.data
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.exceptions import RayError

from ..data.builder import DEFAULT_IMAGE_SIZE
from ..data.errors import DatasetError
from ..data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    PIXEL_MAX,
    _parquet_files,
    check_image_side,
    decode_image,
    parquet_row_count,
    pixels_to_uint8,
    read_parquet_metadata,
    recorded_image_side,
    resolve_parquet_splits,
    sample_seed,
    sample_transform,
    seed_sample_rngs,
    split_transform,
)
from ..engine.config import TrainConfig
from ..engine.data_source import EpochPosition, aug_options
from ..engine.protocols import Batch
from ..environ import environ

TRAIN, VAL = "train", "val"
#: Rows of local shuffle buffer per row of batch (Ray Data shards are shuffled within a window, not globally).
SHUFFLE_BUFFER_BATCHES = 4
#: Ray Data adds the shard file of each row under this column (``read_parquet(include_paths=True)``).
PATH_COLUMN = "path"
#: How a DatasetError raised in a decode actor reads inside Ray's re-raised traceback text.
_DATASET_ERROR_LINE = re.compile(rf"\b{DatasetError.__name__}: (.+)")
#: Decode: at most DECODE_MAX_TASKS concurrent read+decode tasks, each DECODE_CPUS_PER_TASK logical CPUs.
DECODE_MAX_TASKS = 8
DECODE_CPUS_PER_TASK = 1.0
#: Rows per ``DecodeAugment`` call (one Ray Data batch; independent of the training batch size).
DECODE_ROWS_PER_CALL = 64
#: Ray Data's Parquet listing (2.60): a pool of footer-reading actors per execution, sized by this variable
#: (default 32); each actor reads footers in batches of FOOTER_BATCH_ENV files (default 10).
FOOTER_ACTORS_ENV, FOOTER_MAX_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", 32
FOOTER_BATCH_ENV, FOOTER_BATCH_FILES = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE", 10
#: CPUs each Ray Train worker holds (distributed/trainer.py CPUS_PER_WORKER; tests check they agree).
TRAIN_WORKER_CPUS = 1


def decode_pool(cfg: TrainConfig) -> dict[str, Any]:
    """``cpus_per_task`` / ``max_tasks`` for :func:`decoded_dataset` on this cluster.

    The read+decode tasks need a CPU the train workers leave free; where they leave none (a node exactly as big as
    its workers), the tasks take 0 CPUs, one at a time, sharing the workers' CPUs -- slower, never stuck.
    """
    spare = ray.cluster_resources().get("CPU", 0) - cfg.max_workers * TRAIN_WORKER_CPUS
    if spare >= DECODE_CPUS_PER_TASK:  # no more tasks than spare CPUs (Ray Data warns about the excess)
        return {"cpus_per_task": DECODE_CPUS_PER_TASK,
                "max_tasks": max(1, min(DECODE_MAX_TASKS, int(spare // DECODE_CPUS_PER_TASK)))}
    return {"cpus_per_task": 0.0, "max_tasks": 1}


def footer_actors(n_files: int) -> int:
    """Footer-reading actors for listing ``n_files`` shards: one per footer batch, at most Ray's default."""
    per_batch = int(os.environ.get(FOOTER_BATCH_ENV, FOOTER_BATCH_FILES))
    return max(1, min(FOOTER_MAX_ACTORS, math.ceil(n_files / max(per_batch, 1))))


def read_parquet_dataset(path: str | os.PathLike | Sequence[str], **read_kwargs: Any) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` over the shards at ``path`` (a shard, a directory of shards, or a list).

    Rows carry their shard file in a ``path`` column (``include_paths``) so a bad row can be named.
    Listing the shards (every execution: each epoch) starts :func:`footer_actors` footer-reading actors, not
    Ray's fixed 32 (32 new processes per epoch for a few shards); a value the user set in the environment wins.
    """
    if isinstance(path, (str, os.PathLike)):
        paths: Any = [str(file) for file in _parquet_files(path)]
    else:
        paths = [str(file) for file in path]
    read_kwargs.setdefault("include_paths", True)
    if FOOTER_ACTORS_ENV in os.environ:
        return ray.data.read_parquet(paths, **read_kwargs)
    # Ray reads the count when read_parquet builds the file indexer, which the plan carries to execution; its
    # module default is read at import, which must not happen under the override.
    importlib.import_module("ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer")
    with environ({FOOTER_ACTORS_ENV: str(footer_actors(len(paths)))}):
        return ray.data.read_parquet(paths, **read_kwargs)


def parquet_datasets(cfg: TrainConfig) -> dict[str, ray.data.Dataset]:
    """The ``datasets`` a ``TorchTrainer`` streams to its workers for ``dataset: parquet``: the decoded val set.

    The train set is not among them: its augmentation is seeded by epoch, which only the workers know, so
    :class:`RayDataSource` builds it per epoch (:func:`train_dataset`).
    """
    meta = read_parquet_metadata(cfg.parquet_train)
    splits = resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val)  # val never defaults to the train shards
    return {VAL: decoded_dataset(read_parquet_dataset(splits["parquet_val"]), meta["dataset"],
                                 train=False, image_size=cfg.image_size, aug=aug_options(cfg),
                                 image_side=recorded_image_side(meta), **decode_pool(cfg))}


def train_dataset(cfg: TrainConfig, epoch: int, **decode_options: Any) -> ray.data.Dataset:
    """The decoded, augmented training set of ``epoch`` (0-based), seeded by ``cfg.seed`` and the epoch."""
    meta = read_parquet_metadata(cfg.parquet_train)
    train_shards = resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val)["parquet_train"]
    return decoded_dataset(read_parquet_dataset(train_shards), meta["dataset"], train=True,
                           image_size=cfg.image_size, aug=aug_options(cfg), seed=cfg.seed, epoch=epoch,
                           image_side=recorded_image_side(meta), **{**decode_pool(cfg), **decode_options})


def _row_of(path: str, encoded: bytes) -> str:
    """``"row N"`` of the shard ``path`` holding ``encoded`` (error path only: reads the file's image column)."""
    import pyarrow.parquet as pq

    try:
        images = pq.read_table(path, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).to_pylist()
        return f"row {images.index(encoded)}"
    except (OSError, ValueError, KeyError):  # ValueError: not found (or ArrowInvalid)
        return "row ?"


class DecodeAugment:
    """Ray Data ``map_batches`` callable: ``{"image": bytes, "label", "path"}`` -> ready ``{"image", "label"}``.

    ``image`` out is uint8 NCHW, or float32 normalized NCHW when the transform has post-normalize steps (see the
    module docstring).  Train mode seeds each row's augmentation with
    :func:`~dyrep_ray.data.parquet.sample_seed` (``seed``, ``epoch``); eval is deterministic.  A row that does not
    decode raises :class:`DatasetError` naming its shard file and row.
    """

    def __init__(self, dataset: str, *, train: bool, image_size: int = DEFAULT_IMAGE_SIZE,
                 aug: Mapping[str, Any] | None = None, seed: int = 0, epoch: int = 0,
                 image_side: int | None = None) -> None:
        self.split = split_transform(sample_transform(dataset, train=train, image_size=image_size, aug=aug))
        self.train, self.seed, self.epoch = train, seed, epoch
        self.image_side = image_side  # every image's recorded side (synthetic/CIFAR exports), else None
        torch.set_num_threads(1)  # one image at a time per process; parallelism comes from concurrent tasks

    def _one(self, encoded: bytes, label: int, path: str | None) -> torch.Tensor:
        try:
            image = decode_image(encoded, "image")
            check_image_side(image, self.image_side, "image")
        except DatasetError as exc:
            where = f"{path} {_row_of(path, encoded)}" if path else "image"
            raise DatasetError(str(exc).replace("image:", f"{where}:", 1)) from None
        if self.train:
            seed_sample_rngs(sample_seed(self.seed, self.epoch, encoded, label))
        pixels = pixels_to_uint8(self.split.pixels(image))
        return self.split.finish(pixels) if self.split.after_normalize else pixels

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        encoded, labels = _columns(batch)
        paths = batch.get(PATH_COLUMN)
        images = [self._one(None if item is None else bytes(item), int(label),
                            None if paths is None else str(paths[i]))
                  for i, (item, label) in enumerate(zip(encoded, labels))]
        return {IMAGE_COLUMN: torch.stack(images).numpy(), LABEL_COLUMN: np.asarray(labels, dtype=np.int64)}


#: This process's :class:`DecodeAugment` per option set: a pooled Ray worker builds each transform once, not
#: once per batch.  Keyed by ``repr`` of the options (``aug`` is a dict); small: one entry per split and epoch.
_DECODERS: dict[str, DecodeAugment] = {}
_DECODERS_KEPT = 8


def decode_augment_batch(batch: Mapping[str, Any], **options: Any) -> dict[str, np.ndarray]:
    """``map_batches`` function: ``batch`` through this process's :class:`DecodeAugment` for ``options``."""
    key = repr(sorted(options.items()))
    decoder = _DECODERS.get(key)
    if decoder is None:
        if len(_DECODERS) >= _DECODERS_KEPT:
            _DECODERS.pop(next(iter(_DECODERS)))
        decoder = _DECODERS[key] = DecodeAugment(**options)
    return decoder(batch)


def decoded_dataset(
    ds: ray.data.Dataset,
    dataset: str,
    *,
    train: bool,
    image_size: int = DEFAULT_IMAGE_SIZE,
    aug: Mapping[str, Any] | None = None,
    seed: int = 0,
    epoch: int = 0,
    max_tasks: int = DECODE_MAX_TASKS,
    cpus_per_task: float = DECODE_CPUS_PER_TASK,
    rows_per_call: int = DECODE_ROWS_PER_CALL,
    image_side: int | None = None,
) -> ray.data.Dataset:
    """``ds`` (read with ``include_paths=True``) decoded and transformed by :func:`decode_augment_batch` in at most
    ``max_tasks`` concurrent tasks of ``cpus_per_task`` CPUs each (streaming: batches flow as they are ready)."""
    decoded = ds.map_batches(
        decode_augment_batch,
        fn_kwargs=dict(dataset=dataset, train=train, image_size=image_size, aug=aug, seed=seed, epoch=epoch,
                       image_side=image_side),
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, max_tasks)),
        num_cpus=cpus_per_task,
    )
    # Ray Data's per-operator progress bars would reach the console from every train worker, each epoch: the
    # run's console is one line per epoch (--verbose shows Ray's own lines, not these bars).
    decoded.context.enable_progress_bars = False
    return decoded


class ReadyBatchCollate(NumpyBatchCollateFn):
    """``collate_fn`` for batches from :class:`DecodeAugment`: -> ``(float32 NCHW normalized, int64)``.

    uint8 images are normalized here with the transform's own mean/std (bitwise what ``--local`` computes);
    float32 ones are already final.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def for_transform(cls, dataset: str, *, train: bool, image_size: int = DEFAULT_IMAGE_SIZE,
                      aug: Mapping[str, Any] | None = None) -> ReadyBatchCollate:
        split = split_transform(sample_transform(dataset, train=train, image_size=image_size, aug=aug))
        return cls(split.mean, split.std)

    def __call__(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, labels = _columns(batch)
        pixels = np.ascontiguousarray(encoded)
        # Arrays from the object store are read-only; torch wants a writable buffer (float ones are handed on).
        images = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        if images.dtype == torch.uint8:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            images = images.to(torch.float32).div(PIXEL_MAX).sub(mean).div(std)
        return images, torch.tensor(np.asarray(labels), dtype=torch.int64)


def iter_ready_batches(
    data: Any,
    collate: ReadyBatchCollate,
    *,
    batch_size: int,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate ``(images, labels)`` over a :func:`decoded_dataset` (a ``Dataset`` or a ``DataIterator``).

    A :class:`DatasetError` raised in a decode actor (a bad row, named) comes out as that one-line error, not
    as Ray's wrapped task error.
    """
    batches = data.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=drop_last,
                                      local_shuffle_buffer_size=local_shuffle_buffer_size,
                                      local_shuffle_seed=local_shuffle_seed)
    try:
        yield from batches
    except DatasetError:
        raise
    except Exception as exc:  # Ray wraps UDF errors (RayTaskError(UserCodeException)); unwrap ours
        original = _dataset_error_in(exc)
        if original is None:
            raise
        raise DatasetError(str(original)) from None


def _dataset_error_in(exc: BaseException) -> DatasetError | None:
    """The :class:`DatasetError` a Ray Data UDF raised, from the chain Ray wraps it in (None if there is none)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DatasetError) and not isinstance(current, RayError):  # not Ray's dual class
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    match = _DATASET_ERROR_LINE.search(str(exc))
    return DatasetError(match.group(1)) if match else None


def _columns(batch: Mapping[str, Any]) -> tuple[Any, Any]:
    try:
        return batch[IMAGE_COLUMN], batch[LABEL_COLUMN]
    except KeyError as exc:
        raise DatasetError(
            f"batch lacks column {exc}; expected columns {IMAGE_COLUMN!r} and {LABEL_COLUMN!r}"
        ) from None


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
        images = torch.stack([self.transform(decode_image(None if item is None else bytes(item)))
                              for item in encoded])
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


class ShardBatches:
    """An epoch's batches, the first ``skip`` read and dropped; batches from index ``keep_from`` on are also
    appended (as CPU copies) to ``recent``.  An iterator object, not a generator: nothing here holds a batch
    once it is handed out, so the batch dies with the training step's last reference."""

    def __init__(self, batches: Iterator[Batch], skip: int, keep_from: int, recent: deque[torch.Tensor]):
        self.batches, self.skip, self.keep_from, self.recent = batches, skip, keep_from, recent
        self.index = 0

    def __iter__(self) -> ShardBatches:
        return self

    def __next__(self) -> Batch:
        while self.index < self.skip:
            next(self.batches)
            self.index += 1
        batch = next(self.batches)
        if self.index >= self.keep_from and self.recent.maxlen:
            # non_blocking: a CUDA batch is copied to pinned host memory in stream order, no sync
            self.recent.append(batch[0].to("cpu", non_blocking=True))
        self.index += 1
        return batch


class RayDataSource:
    """This worker's Ray Data batches of the Parquet train/val sets: decoded and augmented upstream.

    Val comes from the decoded dataset the ``TorchTrainer`` was given (:func:`parquet_datasets`); train is built
    per epoch (seeded by the epoch, :func:`train_dataset`) on rank 0 and split over the ranks with equal row
    counts.  Resume: the loop restarts an interrupted epoch from its start (checkpoints are at epoch ends), and
    the rebuilt epoch draws the same per-row augmentation as the interrupted one; no batches are skipped.
    Shards cannot be re-read out of step, so BN recalibration uses the epoch's last training batches.
    """

    def __init__(self, cfg: TrainConfig, val_shard: Any, *, rank: int, world_size: int,
                 broadcast: Callable[[Any], Any]) -> None:
        meta = read_parquet_metadata(cfg.parquet_train)
        self.cfg, self.rank, self.world_size, self._broadcast = cfg, rank, world_size, broadcast
        self.num_classes = int(meta["num_classes"])
        self.val_shard = val_shard
        aug = aug_options(cfg)
        self.collates = {split: ReadyBatchCollate.for_transform(meta["dataset"], train=split == TRAIN,
                                                               image_size=cfg.image_size, aug=aug)
                         for split in (TRAIN, VAL)}
        splits = resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val)  # the shards parquet_datasets streams
        self.train_rows = parquet_row_count(splits["parquet_train"])
        self.val_rows = parquet_row_count(splits["parquet_val"])
        self._recent_images: deque[torch.Tensor] = deque(maxlen=cfg.dyrep_recal_bn_iters)

    @classmethod
    def from_ray_train(cls, cfg: TrainConfig, ctx: Any) -> RayDataSource:
        """The val shard Ray Train hands this worker (the launcher gives it), train built per epoch."""
        import ray.train

        return cls(cfg, ray.train.get_dataset_shard(VAL), rank=ctx.rank, world_size=ctx.world_size,
                   broadcast=ctx.broadcast_object)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(self.train_rows / self.world_size / self.cfg.batch_size), 1)

    @property
    def sizes(self) -> tuple[int, int]:
        return self.train_rows, self.val_rows

    def _train_split(self, epoch: int) -> Any:
        if self.world_size == 1:
            return train_dataset(self.cfg, epoch)
        splits = train_dataset(self.cfg, epoch).streaming_split(self.world_size, equal=True) \
            if self.rank == 0 else None
        return self._broadcast(splits)[self.rank]

    def train_batches(self, epoch: int, position: EpochPosition | None = None) -> Iterator[Batch]:
        """The shard's batches of ``epoch``.  Resuming mid-epoch (``position``), the first ``position.step``
        batches are read and dropped: the epoch keeps its step count and LR positions, but which rows they
        were is not reproduced (Ray Data's streaming split hands blocks to workers as they ask), so a Ray Data
        resume is exact in steps, not in data order."""
        batch_size = self.cfg.batch_size
        skip = position.step if position is not None else 0
        batches = iter_ready_batches(
            self._train_split(epoch), self.collates[TRAIN], batch_size=batch_size,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size, local_shuffle_seed=self.cfg.seed + epoch)
        # Recalibration uses the epoch's last batches: only those are kept (one step of slack, an equal split
        # can be a batch shorter than steps_per_epoch), copied off the accelerator without a host sync.
        keep_from = max(self.steps_per_epoch - (self._recent_images.maxlen or 0) - 1, 0)
        return ShardBatches(batches, skip, keep_from, self._recent_images)
    def val_batches(self) -> Iterator[Batch]:
        return iter_ready_batches(self.val_shard, self.collates[VAL],
                                  batch_size=self.cfg.val_batch_size or self.cfg.batch_size)

    def recal_batches(self, salt: int) -> Iterator[torch.Tensor]:
        yield from list(self._recent_images)
