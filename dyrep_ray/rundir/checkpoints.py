"""Which directories of a run are its checkpoints, in what order, and what their ``meta.json`` says.

Checkpoints are only directories named ``checkpoint_epochNNNN`` (or ``checkpoint_epochNNNN_stepSSSSSS``, a
mid-epoch form), ordered by the ``(epoch, global_step)`` their ``meta.json`` records, not by name (so
``checkpoint_epoch10000`` is newer than ``checkpoint_epoch9999``, and a user's ``checkpoint_saved_best`` is
neither loaded nor pruned).  A directory whose meta cannot be read is ordered by its name's numbers and counts
as corrupt when loading.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .layout import CHECKPOINT_PREFIX, META_FILE

# ``checkpoint_epoch0003`` and the mid-epoch ``checkpoint_epoch0003_step000120``; nothing else is ours.
CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}epoch(\d+)(?:_step(\d+))?$")


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(epoch, step)`` from one of our checkpoint directory names (step -1 when absent), else None."""
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else -1


def _meta_position(meta) -> tuple[int, int] | None:
    """``(epoch, global_step)`` of a meta dict, if both are non-negative ints."""
    if not isinstance(meta, dict):
        return None
    epoch, step = meta.get("epoch"), meta.get("global_step")
    if type(epoch) is not int or type(step) is not int or epoch < 0 or step < 0:
        return None
    return epoch, step


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    position: tuple[int, int]   # (epoch, global step) recorded in meta, else parsed from the name
    meta_ok: bool               # False: meta.json unreadable -> the checkpoint counts as corrupt


def _parse_json_strict(text: str):
    def refuse_constant(value: str):
        raise ValueError(f"non-finite number {value}")
    return json.loads(text, parse_constant=refuse_constant)


def read_meta(storage, name: str) -> dict | None:
    """The checkpoint's meta.json as a dict, or None if missing/unreadable/not a JSON object."""
    try:
        text = storage.read_text(f"{name}/{META_FILE}")
        meta = _parse_json_strict(text) if text is not None else None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def list_checkpoints(storage) -> list[CheckpointEntry]:
    """The run's own checkpoint directories, newest first by recorded ``(epoch, global_step)``."""
    entries = []
    for name in storage.list_dirs(CHECKPOINT_PREFIX):
        parsed = parse_checkpoint_name(name)
        if parsed is None:
            continue
        position = _meta_position(read_meta(storage, name))
        entries.append(CheckpointEntry(name, position or (parsed[0], parsed[1]), position is not None))
    # Ties (same recorded position) fall back to the name's numbers, then the name itself: deterministic.
    entries.sort(key=lambda e: (e.position, parse_checkpoint_name(e.name), e.name), reverse=True)
    return entries


def checkpoint_failure_note(storage) -> str:
    """What a failed checkpoint write leaves: the log line's second half (the truth, not a guess)."""
    newest = list_checkpoints(storage)
    if newest:
        return f"{newest[0].name} stays the checkpoint a re-run resumes from"
    return "the run has no checkpoint: a re-run would start over"


def metric_score(meta: dict | None, key: str) -> float:
    """A checkpoint's score for retention; -inf when absent or not a finite number."""
    value = (meta or {}).get("metrics", {}) if isinstance(meta, dict) else {}
    value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return float("-inf")
    return float(value)
