"""The small interface through which the training loop talks to its runtime.

``LocalContext`` runs in the current process without Ray (``--local``).  The Ray
Train implementation lives in :mod:`dyrep_ray.distributed.context`; the loop
never imports Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, LoadedCheckpoint, find_valid_checkpoints, load_checkpoint_dir

logger = logging.getLogger(__name__)

CheckpointWriter = Callable[[Path], None]
CHECKPOINT_PREFIX = "checkpoint_"
SCORE_KEY = "val_top1"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}epoch{epoch:04d}"


def load_newest_valid(candidates: list[Path]) -> LoadedCheckpoint | None:
    """Load the first candidate that verifies; warn about each one skipped."""
    for path in candidates:
        try:
            return load_checkpoint_dir(path)
        except CheckpointError as exc:
            logger.warning("checkpoint unusable, falling back to an earlier one: %s", exc)
    return None


class LocalContext:
    """Single process, single device; checkpoints go straight into the run directory."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device, run_dir: str | Path, keep_checkpoints: int = 2):
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
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
        return load_newest_valid(find_valid_checkpoints(self.run_dir, CHECKPOINT_PREFIX))

    def report(self, metrics: dict, epoch: int, write_checkpoint: CheckpointWriter | None) -> None:
        if write_checkpoint is None:
            return
        target = self.run_dir / checkpoint_dir_name(epoch)
        if target.exists():  # left by a run killed after this epoch's checkpoint: replace
            shutil.rmtree(target)
        try:
            write_checkpoint(target)
        except OSError as exc:
            logger.error("checkpoint for epoch %d NOT written (%s); the previous checkpoint stays valid", epoch, exc)
            return
        self._prune()

    def _prune(self) -> None:
        """Keep the best ``keep_checkpoints`` by val_top1 plus the latest."""
        ckpts = find_valid_checkpoints(self.run_dir, CHECKPOINT_PREFIX)
        if len(ckpts) <= self.keep_checkpoints:
            return
        latest = ckpts[0]

        def score(p: Path) -> float:
            metrics = json.loads((p / "meta.json").read_text()).get("metrics", {})
            return float(metrics.get(SCORE_KEY, float("-inf")))

        best = sorted(ckpts, key=score, reverse=True)[: self.keep_checkpoints]
        for p in ckpts:
            if p != latest and p not in best:
                shutil.rmtree(p, ignore_errors=True)
