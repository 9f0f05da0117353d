"""The two seams of the training loop: the runtime it runs in and the data it reads.

:class:`TrainContext` is what :class:`~dyrep_ray.engine.loop.Trainer` needs from its runtime -- a single
process (:class:`~dyrep_ray.engine.context.LocalContext`) or a Ray Train worker
(:class:`~dyrep_ray.distributed.context.RayTrainContext`).  :class:`DataSource` is where its batches come from --
torch DataLoaders (:class:`~dyrep_ray.engine.data_source.TorchDataSource`) or Ray Data shards
(:class:`~dyrep_ray.distributed.ray_data.RayDataSource`).  The loop knows nothing else of either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ..rundir.storage import RunStorage
from .checkpoint import LoadedCheckpoint

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig
    from .state import TrainState

CheckpointWriter = Callable[[Path], None]
Batch = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


@runtime_checkable
class TrainContext(Protocol):
    """One rank's runtime: identity, device, collectives, run storage, resume and per-epoch report."""

    rank: int
    world_size: int
    device: torch.device
    storage: RunStorage

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes the run files."""
        ...

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module to train (DDP-wrapped when distributed); called again after every structure change."""
        ...

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (in place where possible); returns it."""
        ...

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...

    def resume_checkpoint(self) -> LoadedCheckpoint | None:
        """The checkpoint this run continues from, None for a fresh start."""
        ...

    def report(self, metrics: dict[str, Any], epoch: int, write_checkpoint: CheckpointWriter | None) -> None:
        """End of epoch ``epoch`` (1-based) on every rank; ``write_checkpoint(dir)`` persists one when given."""
        ...


@runtime_checkable
class DataSource(Protocol):
    """One rank's batches: ``(images NCHW float32, labels int64)`` on the CPU; the trainer moves them."""

    num_classes: int

    @property
    def steps_per_epoch(self) -> int:
        """Training steps of one epoch on this rank (for the LR schedule and mid-epoch hooks)."""
        ...

    @property
    def sizes(self) -> tuple[int, int]:
        """(train images, val images) over all ranks."""
        ...

    def train_batches(self, epoch: int, position: Any = None) -> Iterable[Batch]:
        """This rank's training batches of ``epoch`` (0-based), shuffled reproducibly per epoch; with
        ``position`` (an :class:`~dyrep_ray.engine.data_source.EpochPosition`), the rest of an epoch a mid-epoch
        checkpoint left part-way."""
        ...

    def val_batches(self) -> Iterable[Batch]:
        """This rank's part of the validation set, each image on exactly one rank."""
        ...

    def recal_batches(self, salt: int) -> Iterable[torch.Tensor]:
        """Images for BN recalibration, deterministic per (seed, ``salt``, rank)."""
        ...


DataFactory = Callable[["TrainConfig", TrainContext], DataSource]


class TrainerView(Protocol):
    """What a :class:`~dyrep_ray.engine.callbacks.TrainerCallback` may read of the running trainer (the callbacks
    name this rather than :class:`~dyrep_ray.engine.loop.Trainer`, so the loop and its hooks do not import each
    other)."""

    cfg: TrainConfig
    ctx: TrainContext
    data: DataSource
    model: nn.Module
    num_classes: int
    plain_params: int
    plain_macs: int
    state: TrainState

    def save_mid_epoch_checkpoint(self) -> str | None:
        """Every rank, between two steps: rank 0 writes a checkpoint of the epoch in progress."""
        ...
