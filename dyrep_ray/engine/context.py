"""Runtimes of the training loop (the :class:`~dyrep_ray.engine.protocols.TrainContext` protocol).

``LocalContext`` runs in the current process without Ray (``--local``).  The Ray
Train implementation lives in :mod:`dyrep_ray.distributed.context`; the loop
never imports Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint_dir
from .layout import CHECKPOINT_PREFIX, checkpoint_dir_name
from .protocols import CheckpointWriter, TrainContext
from .storage import RunStorage

logger = logging.getLogger(__name__)

__all__ = ["CheckpointWriter", "LocalContext", "TrainContext", "as_storage", "load_newest_valid"]
SCORE_KEY = "val_top1"


def as_storage(run_dir: str | Path | RunStorage) -> RunStorage:
    if isinstance(run_dir, RunStorage):
        return run_dir
    text = str(run_dir).rstrip("/")
    parent, _, name = text.rpartition("/")
    return RunStorage(parent or ".", name)


def load_newest_valid(storage: RunStorage, skip: str | None = None) -> LoadedCheckpoint | None:
    """Newest checkpoint in the run directory that verifies; warns about each one skipped.

    Returns None only when the run has no checkpoint at all: if checkpoints exist
    but none is usable, raises :class:`CheckpointError` rather than silently
    starting from scratch.
    """
    names = [n for n in sorted(storage.list_dirs(CHECKPOINT_PREFIX), reverse=True)]  # zero-padded epochs
    problems = []
    for name in names:
        if name == skip:
            problems.append(f"{name}: unusable latest checkpoint")
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
    if names:
        raise CheckpointError(f"run directory {storage.root} has {len(names)} checkpoint(s) but none is valid "
                              f"({problems[0]}); move them away to start over, or use a new --name")
    return None


class LocalContext:
    """Single process, single device; checkpoints go straight into the run directory."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device, run_dir: str | Path | RunStorage, keep_checkpoints: int = 2):
        self.device = torch.device(device)
        self.storage = as_storage(run_dir)
        self.keep_checkpoints = keep_checkpoints

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
            if self.storage.local:
                target = Path(self.storage.path(name))
                if target.exists():  # left by a run killed after this epoch's checkpoint: replace
                    shutil.rmtree(target)
                write_checkpoint(target)
            else:
                tmp = Path(tempfile.mkdtemp(prefix="dyrep-ckpt-"))
                try:
                    write_checkpoint(tmp / name)
                    self.storage.upload_dir(tmp / name, name)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            logger.error("checkpoint for epoch %d NOT written (%s); the previous checkpoint stays valid", epoch, exc)
            return
        self._prune()

    def _prune(self) -> None:
        """Keep the best ``keep_checkpoints`` by val_top1 plus the latest."""
        names = sorted(self.storage.list_dirs(CHECKPOINT_PREFIX), reverse=True)
        if len(names) <= self.keep_checkpoints:
            return

        def score(name: str) -> float:
            try:
                meta = json.loads(self.storage.read_text(f"{name}/meta.json") or "{}")
            except ValueError:
                return float("-inf")
            return float(meta.get("metrics", {}).get(SCORE_KEY, float("-inf")))

        best = sorted(names, key=score, reverse=True)[: self.keep_checkpoints]
        for name in names[1:]:
            if name not in best:
                self.storage.delete_dir(name)
