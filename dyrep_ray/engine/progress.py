"""The console of a training run: one line per epoch, and a progress bar within the epoch (``--local``).

Both are :class:`~dyrep_ray.engine.callbacks.TrainerCallback` instances acting on the main rank only.  The bar
counts steps and never reads the loss tensor (that would be a host sync per step); the epoch's loss appears in
the epoch line.  Torch-free at import, like the callbacks module.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from .callbacks import TrainerCallback

if TYPE_CHECKING:
    from tqdm import tqdm

#: The logger of what the console shows by default (header, epoch lines, summary); the CLI routes it to stdout.
CONSOLE_LOGGER = "dyrep_ray.console"
console = logging.getLogger(CONSOLE_LOGGER)
#: Marks an epoch line (``--quiet`` hides those) in a record's ``extra``.
EPOCH_LINE = "epoch_line"


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One metrics.jsonl row (or a Tune result) as the console's epoch line (structure events at the end)."""
    events = "".join(f"  [{event}]" for event in event_labels(metrics))
    return (f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  top-1 {metrics['val_top1']:.2f}%  "
            f"lr {metrics['lr']:.5f}  params {metrics['params']:,}  blocks {metrics['n_blocks']}  "
            f"{metrics['images_per_s']:.0f} img/s  {metrics['epoch_time_s']:.1f}s{events}")


#: Key of the flat, comma-separated structure events in what workers report to Ray (Tune results are flat).
EVENTS_TEXT = "structure_events"


def event_labels(metrics: dict[str, Any]) -> list[str]:
    """``["grow features.0.0", ...]`` from a metrics.jsonl row (``events``) or a Ray report (:data:`EVENTS_TEXT`)."""
    if metrics.get("events"):
        return [f"{e.get('op')} {e.get('path')}" for e in metrics["events"]]
    return [label for label in str(metrics.get(EVENTS_TEXT) or "").split(", ") if label]


class EpochLines(TrainerCallback):
    """Logs :func:`epoch_line` to the console logger after every epoch (main rank)."""

    def on_epoch_end(self, trainer, metrics: dict[str, Any]) -> None:
        if trainer.ctx.is_main:
            console.info(epoch_line(metrics, trainer.cfg.epochs), extra={EPOCH_LINE: True})


class ProgressBar(TrainerCallback):
    """A tqdm bar over the steps of the running epoch, on stderr; off when stderr is not a terminal."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self._bar: tqdm | None = None

    def _on(self, trainer) -> bool:
        if not trainer.ctx.is_main:
            return False
        return sys.stderr.isatty() if self.enabled is None else self.enabled

    def on_step_end(self, trainer, epoch: int, step: int, loss) -> None:
        if self._bar is None:
            if not self._on(trainer):
                return
            from tqdm import tqdm

            self._bar = tqdm(total=trainer.data.steps_per_epoch, desc=f"epoch {epoch + 1}/{trainer.cfg.epochs}",
                             unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)
        self._bar.update(1)

    def on_epoch_end(self, trainer, metrics: dict[str, Any]) -> None:
        self._close()  # before the epoch line, so the line is not drawn through the bar

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __getstate__(self) -> dict:  # a callback may be pickled to workers: never with an open bar
        return {**self.__dict__, "_bar": None}
