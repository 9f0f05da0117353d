"""Fault-injection callbacks for resilience tests: real process death, real exceptions, real stalls, NaN losses.

Pass them to :class:`~dyrep_ray.engine.loop.Trainer` (``--local``) or to
:func:`dyrep_ray.distributed.trainer.run_distributed` (Ray Train workers get them through the train loop config).
``epoch`` is 0-based, as in every :class:`~dyrep_ray.engine.callbacks.TrainerCallback`.  A fault with a
``marker`` file fires once across processes: the marker records that it fired, so a worker Ray restarts (which
gets a fresh copy of the callback) runs on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .callbacks import TrainerCallback

if TYPE_CHECKING:  # pragma: no cover
    from .protocols import TrainerView

logger = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by :class:`RaiseAt`."""


@dataclass(frozen=True)
class _MidEpochFault(TrainerCallback):
    """Fires once, after step ``step`` (0-based; None: the middle step) of ``epoch``, on ``rank`` (None: every
    rank).  A mid-epoch checkpoint due at that step is written before it fires."""

    epoch: int
    rank: int | None = 0
    marker: str | None = None
    step: int | None = None

    def on_step_end(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> None:
        at = trainer.data.steps_per_epoch // 2 if self.step is None else self.step
        if epoch != self.epoch or step != at:
            return
        rank = trainer.ctx.rank
        if self.rank is not None and rank != self.rank:
            return
        if self.marker is not None and Path(self.marker).exists():
            return
        self.fire(epoch, rank)

    def claim(self, what: str, epoch: int, rank: int) -> bool:
        """Record (in the marker) that the fault fires now, before it takes the process down; False when another
        process (another trial of a sweep) created the marker first: the fault has fired, this one does not."""
        if self.marker is not None:
            try:
                with open(self.marker, "x") as marker:  # exclusive: one process wins
                    marker.write(f"{what} at epoch {epoch} rank {rank} pid {os.getpid()}\n")
            except FileExistsError:
                return False
        logger.warning("fault injection: %s at epoch %d on rank %d", what, epoch, rank)
        return True

    def fire(self, epoch: int, rank: int) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class KillAt(_MidEpochFault):
    """SIGKILL this process mid-``epoch`` on ``rank``: a real worker (or process) death."""

    def fire(self, epoch: int, rank: int) -> None:
        if self.claim("kill", epoch, rank):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class RaiseAt(_MidEpochFault):
    """Raise :class:`InjectedFault` mid-``epoch`` on ``rank``."""

    def fire(self, epoch: int, rank: int) -> None:
        if self.claim("raise", epoch, rank):
            raise InjectedFault(f"injected fault at epoch {epoch} on rank {rank}")


@dataclass(frozen=True)
class SleepAt(_MidEpochFault):
    """Stall mid-``epoch`` for ``seconds`` (every rank by default): a window for a test to kill the driver.

    The marker, when given, is only read: an existing marker disables the stall.
    """

    rank: int | None = None
    seconds: float = 60.0

    def fire(self, epoch: int, rank: int) -> None:
        logger.warning("fault injection: sleeping %g s in epoch %d", self.seconds, epoch)
        time.sleep(self.seconds)


@dataclass(frozen=True)
class NanLoss(TrainerCallback):
    """Make the loss of the first ``steps`` steps of ``epoch`` NaN on every rank."""

    epoch: int
    steps: int = 1

    def transform_loss(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        if epoch == self.epoch and step < self.steps:
            return loss * float("nan")
        return loss
