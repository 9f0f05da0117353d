"""Typed run files: one epoch's metrics (a line of ``metrics.jsonl``) and a checkpoint's ``meta.json``.

Torch-free.  ``to_json`` gives the dict written to disk, with the keys (and key order) dyrep-ray always wrote;
``from_json`` reads it back, also from older run directories (missing optional keys take defaults, unknown keys
are kept in ``extra`` and written back unchanged).  The DyRep ``events`` stay JSON dicts here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .checkpoints import list_checkpoints, read_meta
from .layout import META_FILE, METRICS_FILE
from .storage import RunStorage

logger = logging.getLogger(__name__)

VAL_KEYS = ("val_loss", "val_top1", "val_top5")
EMA_PREFIX = "ema_"


def _split_known(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass(frozen=True)
class EpochMetrics:
    """What one completed epoch measured, as one line of ``metrics.jsonl`` (``epoch`` is 1-based)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    params: int
    n_blocks: int
    epoch_time_s: float
    train_time_s: float
    adjust_time_s: float
    images_per_s: float
    skipped_steps: int
    events: list[dict[str, Any]] = field(default_factory=list)
    replica_digests: list[str] | None = None  # every rank's model digest, at epochs with a structure change
    ema: dict[str, float] | None = None  # the EMA model's val_loss / val_top1 / val_top5
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("replica_digests", "ema", "extra")}
        if self.replica_digests is not None:
            out["replica_digests"] = self.replica_digests
        if self.ema is not None:
            out.update({f"{EMA_PREFIX}{k}": v for k, v in self.ema.items()})
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochMetrics:
        data = dict(data)
        ema = {k: data.pop(f"{EMA_PREFIX}{k}") for k in VAL_KEYS if f"{EMA_PREFIX}{k}" in data} or None
        known, extra = _split_known(cls, data)
        return cls(**known, ema=ema, extra=extra)


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json`` of a checkpoint: where training stands, how it was configured, what the plain model is."""

    epoch: int  # epochs completed
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochMetrics.to_json() of every epoch so far
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest epoch's
    config: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    plain_params: int | None = None
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. format_version, added by the writer

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckpointMeta:
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)


def parse_metrics(text: str, *, strict: bool = True, source: str = METRICS_FILE) -> tuple[list[dict], int]:
    """(epoch records of a ``metrics.jsonl`` text in epoch order, number of unreadable lines skipped).

    ``strict``: an unreadable line raises ``ValueError``; otherwise it is skipped, counted and warned about.
    A repeated epoch keeps its latest record.
    """
    records: dict[int, dict] = {}
    skipped = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:  # Infinity, deep nesting
            if strict:
                raise ValueError(f"{source} line {number} is not an epoch record ({exc})") from exc
            skipped += 1
            continue
        records[epoch] = record
    if skipped:
        logger.warning("%s: skipped %d unreadable line(s)", source, skipped)
    return [records[e] for e in sorted(records)], skipped


def read_metrics(storage: RunStorage) -> list[dict]:
    """The run's epoch records (``[]`` before the first epoch); raises ``ValueError`` on an unreadable line."""
    return parse_metrics(storage.read_text(METRICS_FILE) or "", source=storage.path(METRICS_FILE))[0]


def plain_params_from(storage: RunStorage) -> int | None:
    """Parameter count of the untouched model, from the newest checkpoint meta that records it.

    None when no checkpoint does (no checkpoint yet, or all unreadable): the caller decides what that means.
    """
    # Newest first by the (epoch, step) meta records, only the project's own checkpoint directories: a user's
    # ``checkpoint_saved_best`` or ``checkpoint_epoch10000`` vs ``...9999`` must not change the answer.
    for entry in list_checkpoints(storage):
        meta = read_meta(storage, entry.name) if entry.meta_ok else None
        if meta is None:
            logger.warning("%s: unreadable %s", entry.name, META_FILE)
            continue
        value = meta.get("plain_params")
        if type(value) is int and value >= 0:
            return value
    return None
