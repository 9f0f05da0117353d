"""TensorBoard event files in ``<run_dir>/tensorboard/``: per-epoch scalars, structure events, params/MACs.

Written with :class:`torch.utils.tensorboard.SummaryWriter` (needs the ``tensorboard`` package) and flushed
after every epoch, so ``tensorboard --logdir <run_dir>`` shows a run while it trains. On an object-store run
directory the event files are written to a local staging directory and uploaded after every epoch.
A resumed run writes a new event file with a purge marker, so TensorBoard drops the old file's points for
the epochs that are trained again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile

from ..rundir.layout import TENSORBOARD_DIR
from .base import (
    TrackingCallback,
    completed_epochs,
    epoch_scalars,
    event_counts,
)

logger = logging.getLogger(__name__)

# Step of the run-level entries (model size, config): before the first epoch (epochs are 1-based).
START_STEP = 0


def describe_event(event: dict) -> str:
    details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("op", "path"))
    return f"- {event.get('op')} `{event.get('path')}`" + (f" ({details})" if details else "")


def events_markdown(epoch: int, events: list[dict]) -> str:
    """One text entry for one adjust: a markdown list of its grow/cut events."""
    if not events:
        return f"adjust after epoch {epoch}: no structure change"
    counts = event_counts(events)
    head = f"adjust after epoch {epoch}: {counts['grows']} grow(s), {counts['cuts']} cut(s)"
    return "\n".join([head, ""] + [describe_event(e) for e in events])


class TensorBoardCallback(TrackingCallback):
    backend = "TensorBoard"

    def __init__(self, run_dir=None):
        super().__init__(run_dir)
        self.writer = None
        self.log_dir: str | None = None
        self._staging: str | None = None  # local event-file dir for an object-store run directory
        self._pending_adjust: list | None = None

    def _fit_start(self, trainer) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            self.disable("the tensorboard package is not installed (pip install tensorboard)", exc)
            return
        if self.storage.local:
            self.log_dir = self.storage.path(TENSORBOARD_DIR)
        else:
            self._staging = tempfile.mkdtemp(prefix="dyrep-tb-")
            self.log_dir = self._staging
            if TENSORBOARD_DIR in self.storage.list_dirs(TENSORBOARD_DIR):  # resumed: keep the earlier files
                self.storage.download_dir(TENSORBOARD_DIR, self._staging)
        done = completed_epochs(trainer)
        try:
            # purge_step: on resume TensorBoard discards earlier files' events from the first re-trained epoch on
            self.writer = SummaryWriter(self.log_dir, purge_step=done + 1 if done else None)
        except Exception as exc:  # noqa: BLE001 -- any reason the directory cannot be written
            self.disable(f"cannot write event files to {self.storage.path(TENSORBOARD_DIR)}", exc)
            return
        from ..models import count_params

        step = done if done else START_STEP
        self.writer.add_scalar("model/plain_params", trainer.plain_params, step)
        self.writer.add_scalar("model/plain_macs", trainer.plain_macs, step)
        self.writer.add_scalar("model/train_params", count_params(trainer.model), step)
        if not done:
            self.writer.add_text("config", "```\n" + json.dumps(trainer.cfg.to_dict(), indent=1, sort_keys=True)
                                 + "\n```", START_STEP)
        self._flush()

    def _adjust(self, trainer, epoch: int, events: list) -> None:
        self._pending_adjust = list(events)  # written with the epoch's row, under its 1-based epoch number

    def _epoch_end(self, trainer, metrics: dict) -> None:
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for key, value in epoch_scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        events = self._pending_adjust if self._pending_adjust is not None else list(metrics.get("events", []))
        for key, value in event_counts(events).items():
            self.writer.add_scalar(f"structure/{key}", value, step)
        if self._pending_adjust is not None or events:
            self.writer.add_text("structure_events", events_markdown(step, events), step)
        self._pending_adjust = None
        self._flush()

    def _fit_end(self, trainer, summary: dict) -> None:
        if self.writer is None:
            return
        if summary:
            lines = [f"- {k}: {v}" for k, v in summary.items()]
            self.writer.add_text("summary", "\n".join(lines), int(summary.get("epochs", START_STEP)))
        self.writer.close()
        self._upload()
        self.writer = None
        self._remove_staging()

    def _flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self._staging is not None:
            self.storage.upload_dir(self._staging, TENSORBOARD_DIR)

    def _remove_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._remove_staging()
