"""Runtimes of the training loop (the :class:`~dyrep_ray.engine.protocols.TrainContext` protocol).

``LocalContext`` runs in the current process without Ray (``--local``).  The Ray
Train implementation lives in :mod:`dyrep_ray.distributed.context`; the loop
never imports Ray.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..rundir.checkpoints import checkpoint_failure_note, list_checkpoints, metric_score, read_meta
from ..rundir.layout import METRICS_FILE, checkpoint_dir_name
from ..rundir.storage import RunStorage, as_storage
from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint_dir
from .protocols import CheckpointWriter, TrainContext

logger = logging.getLogger(__name__)

__all__ = ["CheckpointWriter", "LocalContext", "TrainContext", "as_storage", "load_newest_valid"]
SCORE_KEY = "val_top1"


def load_newest_valid(storage: RunStorage, skip: str | None = None) -> LoadedCheckpoint | None:
    """Newest of the run's own checkpoints (by the epoch/step their meta records) that verifies and whose
    content is well-formed; warns about each one skipped.

    Only ``checkpoint_epochNNNN[_stepS]`` directories are considered (a user's ``checkpoint_saved_best`` is
    neither loaded nor counted).  Returns None only when the run has no checkpoint at all: if checkpoints
    exist but none is usable, raises :class:`CheckpointError` rather than silently starting from scratch.
    """
    entries = list_checkpoints(storage)
    problems = []
    for entry in entries:
        name = entry.name
        if name == skip:
            problems.append(f"{name}: unusable latest checkpoint")
            continue
        if not entry.meta_ok:
            problems.append(f"{storage.path(name)}: unreadable meta.json (no integer epoch/global_step)")
            logger.warning("checkpoint unusable, falling back to an earlier one: %s", problems[-1])
            continue
        tmp = None
        try:
            if storage.local:
                return load_checkpoint_dir(storage.path(name))
            tmp = storage.temp_download(name)
            return load_checkpoint_dir(tmp)
        except (CheckpointError, OSError) as exc:
            problems.append(str(exc))
            logger.warning("checkpoint unusable, falling back to an earlier one: %s", exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp.parent, ignore_errors=True)
    if entries:
        raise CheckpointError(f"run directory {storage.root} has {len(entries)} checkpoint(s) but none is valid "
                              f"({problems[0]}); move them away to start over, or use a new --name")
    recorded = _recorded_epochs(storage)
    if recorded:  # never start over silently: the epochs recorded so far are replaced
        logger.warning("%s records %d epoch(s) in %s but holds no checkpoint (none was written yet, or writing "
                       "failed): training starts over from epoch 1", storage.root, recorded, METRICS_FILE)
    return None


def _recorded_epochs(storage: RunStorage) -> int:
    try:
        text = storage.read_text(METRICS_FILE) or ""
    except (OSError, UnicodeDecodeError):
        return 0
    return sum(1 for line in text.splitlines() if line.strip())


class NoCheckpointError(CheckpointError):
    """Not one checkpoint of a run could be written."""


def require_a_checkpoint(storage: RunStorage, checkpoint_every: int) -> None:
    """Raise :class:`NoCheckpointError` when a finished run recorded at least ``checkpoint_every`` epochs (so a
    checkpoint was due) but holds none: its epochs cannot be resumed (the Ray path's end-of-run check; the
    workers' write errors stay in their logs)."""
    epochs = _recorded_epochs(storage)
    if epochs >= checkpoint_every and not list_checkpoints(storage):
        raise NoCheckpointError(f"no checkpoint of this run could be written ({epochs} epoch(s) recorded in "
                                f"{METRICS_FILE}, no checkpoint directory); nothing can be resumed: free disk space "
                                "(or raise ulimit -f) and re-run")


class LocalContext:
    """Single process, single device; checkpoints go straight into the run directory."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device, run_dir: str | Path | RunStorage, keep_checkpoints: int = 2):
        self.device = torch.device(device)
        self.storage = as_storage(run_dir)
        self.keep_checkpoints = keep_checkpoints
        self.write_error: str | None = None  # the last checkpoint write that failed

    def check_resumable(self) -> None:
        """Raise :class:`NoCheckpointError` when checkpoints were due but not one could be written: the run's
        epochs cannot be resumed, which must not end with exit code 0."""
        if self.write_error is not None and not list_checkpoints(self.storage):
            raise NoCheckpointError(f"no checkpoint of this run could be written (last: {self.write_error}); "
                                    "nothing can be resumed: free disk space (or raise ulimit -f) and re-run")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def broadcast_object(self, obj):
        return obj

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_object(self, obj) -> list:
        return [obj]

    def resume_checkpoint(self) -> LoadedCheckpoint | None:
        return load_newest_valid(self.storage)

    def report(self, metrics: dict, epoch: int, write_checkpoint: CheckpointWriter | None) -> None:
        if write_checkpoint is None:
            return
        name = checkpoint_dir_name(epoch)
        try:
            self.storage.write_dir(name, write_checkpoint)  # replaces one a run killed after this epoch left
        except OSError as exc:  # CheckpointWriteError (torch.save's RuntimeError, e.g. disk full) included
            self.write_error = f"checkpoint for epoch {epoch}: {exc}"
            logger.error("checkpoint for epoch %d NOT written (%s); %s", epoch, exc,
                         checkpoint_failure_note(self.storage))
            return
        self._prune(keep_name=name)

    def _prune(self, keep_name: str | None = None) -> None:
        """Keep the best ``keep_checkpoints`` by val_top1 plus the newest (by recorded epoch/step).

        Only the run's own ``checkpoint_epochNNNN`` directories are candidates; anything else (a user's
        ``checkpoint_saved_best``) is never deleted.  ``keep_name`` (the one just written) always stays.
        """
        entries = list_checkpoints(self.storage)
        if len(entries) <= self.keep_checkpoints:
            return
        newest = {entries[0].name, keep_name}
        scores = {e.name: metric_score(read_meta(self.storage, e.name), SCORE_KEY) for e in entries}
        best = set(sorted(scores, key=lambda n: scores[n], reverse=True)[: self.keep_checkpoints])
        for entry in entries:
            if entry.name not in best and entry.name not in newest:
                self.storage.delete_dir(entry.name)
