"""What every tracking backend shares: rank-0 gating and "one warning, then off" failure handling."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..engine.callbacks import TrainerCallback
from ..rundir.layout import TENSORBOARD_DIR, TRACKING_FILE
from ..rundir.storage import RunStorage, as_storage

logger = logging.getLogger("dyrep_ray.tracking")

__all__ = ["TENSORBOARD_DIR", "TRACKING_FILE", "TrackingCallback"]  # the names live in rundir.layout

# A warning stays one readable line even when a backend's exception carries a page of text.
WARNING_DETAIL_CHARS = 300


def _squash(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}").strip()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most :data:`WARNING_DETAIL_CHARS`; a long one keeps its root cause.

    (MLflow wraps e.g. ``ConnectionRefusedError`` in a page of request details: the cause is what matters.)
    """
    text, root = _squash(exc), root_cause(exc)
    if len(text) <= WARNING_DETAIL_CHARS or root is exc:
        return _cut(text, WARNING_DETAIL_CHARS)
    cause = _cut(_squash(root), WARNING_DETAIL_CHARS // 2)
    return f"{_cut(text, WARNING_DETAIL_CHARS - len(cause) - 10)} (cause: {cause})"


# Per-epoch metrics.jsonl keys that are not scalars to plot.
NON_SCALAR_KEYS = ("epoch", "events", "replica_digests")


def epoch_scalars(metrics: dict) -> dict[str, float]:
    """The plottable numbers of one metrics.jsonl row (ints and floats; never bools, never the epoch itself)."""
    return {k: v for k, v in metrics.items()
            if k not in NON_SCALAR_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def event_counts(events: list[dict]) -> dict[str, int]:
    return {"grows": sum(e.get("op") == "grow" for e in events), "cuts": sum(e.get("op") == "cut" for e in events)}


def completed_epochs(trainer) -> int:
    """Epochs already done when fit starts (non-zero on resume)."""
    state = getattr(trainer, "state", None)
    return int(getattr(state, "epoch", 0) or 0)


class TrackingCallback(TrainerCallback):
    """Base of the tracking callbacks: a :class:`TrainerCallback` the training loop calls on every rank.

    Subclasses implement the ``_fit_start`` ... ``_fit_end`` methods they need. The public ``on_*`` hooks run
    them only on the main rank and only while the backend is enabled; any exception from a backend becomes
    one warning and disables the backend for the rest of the run (tracking must never fail training).
    """

    backend = "tracking"

    def __init__(self, run_dir: str | Path | RunStorage | None = None):
        self._run_dir = run_dir
        self.enabled = True
        self.storage: RunStorage | None = None

    # ------------------------------------------------------------------ the loop's hooks
    def on_fit_start(self, trainer) -> None:
        if not trainer.ctx.is_main:
            self.enabled = False  # other ranks never track: silently off
            return
        if self.enabled:
            self.storage = as_storage(self._run_dir) if self._run_dir is not None else trainer.ctx.storage
        self._guarded("start", self._fit_start, trainer)

    # on_step_end stays the base's no-op: per-step logging would cost a host sync per step; epochs are tracked.

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        self._guarded("log epoch metrics", self._epoch_end, trainer, metrics)

    def on_adjust(self, trainer, epoch: int, events: list) -> None:
        self._guarded("log structure events", self._adjust, trainer, epoch, events)

    def on_fit_end(self, trainer, summary: dict) -> None:
        self._guarded("finish", self._fit_end, trainer, summary)

    # ------------------------------------------------------------------ backend implementation
    def _fit_start(self, trainer) -> None:
        pass

    def _epoch_end(self, trainer, metrics: dict) -> None:
        pass

    def _adjust(self, trainer, epoch: int, events: list) -> None:
        pass

    def _fit_end(self, trainer, summary: dict) -> None:
        pass

    def _close(self) -> None:
        """Release what the backend holds after it was disabled (best effort)."""

    # ------------------------------------------------------------------ failure handling
    def _guarded(self, action: str, fn, *args) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 -- whatever a tracking backend raises, training goes on
            self.disable(f"could not {action}", exc)

    def disable(self, problem: str, exc: BaseException | None = None) -> None:
        """Warn once (one line) and switch this backend off for the rest of the run."""
        if not self.enabled:
            return
        self.enabled = False
        detail = f" ({one_line(exc)})" if exc is not None else ""
        logger.warning("%s tracking disabled for this run: %s%s", self.backend, problem, detail)
        try:
            self._close()
        except Exception:  # already disabled; a failing close adds nothing
            logger.debug("%s: close after failure failed", self.backend, exc_info=True)
