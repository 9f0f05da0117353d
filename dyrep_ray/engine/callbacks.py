"""Hooks into the trainer: fault injection, console output, tracking, preemption.

A callback sees the trainer as a :class:`~dyrep_ray.engine.protocols.TrainerView`, never the loop's class (so the
loop and its hooks do not import each other).

A callback subclasses :class:`TrainerCallback` and overrides only the methods it needs; every method is a no-op
here.  The trainer calls them on every rank, in list order.  ``epoch`` is 0-based, ``step`` counts within the
epoch.  Callbacks travel to Ray Train workers inside the ``train_loop_config`` (cloudpickled), so they must be
picklable and must not hold driver-only resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover -- torch only in annotations: tracking and the CLI import this torch-free
    import torch

    from .protocols import TrainerView


class TrainerCallback:
    """No-op base class of every trainer callback."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Before the first epoch (also after a resume)."""

    def transform_loss(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of (``epoch``, ``step``) before backward; return it unchanged unless injecting a fault."""
        return loss

    def on_step_end(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> None:
        """After every step (also a skipped one); ``loss`` is the step's detached loss tensor (no host sync)."""

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        """After an epoch's metrics are final, before its report/checkpoint; ``metrics`` as in metrics.jsonl."""

    def on_adjust(self, trainer: TrainerView, epoch: int, events: list[dict[str, Any]]) -> None:
        """After a DyRep structure change at the end of ``epoch``; ``events`` are the grow/cut events."""

    def on_checkpoint(self, trainer: TrainerView, epoch: int) -> None:
        """After the checkpoint of ``epoch`` (0-based: the epoch just finished) was handed to the context."""

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        """After the last epoch, with the run summary."""


class CallbackList:
    """Calls one hook on every callback in order (what the trainer holds)."""

    def __init__(self, callbacks: Iterable[TrainerCallback] = ()) -> None:
        self.callbacks: Sequence[TrainerCallback] = tuple(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, TrainerCallback):
                raise TypeError(f"{callback!r} is not a TrainerCallback")

    def on_fit_start(self, trainer: TrainerView) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(trainer)

    def transform_loss(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        for callback in self.callbacks:
            loss = callback.transform_loss(trainer, epoch, step, loss)
        return loss

    def on_step_end(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer, epoch, step, loss)

    def on_epoch_end(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(trainer, metrics)

    def on_adjust(self, trainer: TrainerView, epoch: int, events: list[dict[str, Any]]) -> None:
        for callback in self.callbacks:
            callback.on_adjust(trainer, epoch, events)

    def on_checkpoint(self, trainer: TrainerView, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(trainer, epoch)

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(trainer, summary)
