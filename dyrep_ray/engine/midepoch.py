"""Mid-epoch checkpoints (``checkpoint_every_steps``, preemption): what they record, where they go, which stay.

A mid-epoch checkpoint is a normal checkpoint directory (same files, same atomic write, same safe loading)
named ``checkpoint_epochNNNN_stepSSSSSS`` (``NNNN`` = epochs completed, ``SSSSSS`` = global step) whose
``meta.json`` also holds ``step_in_epoch`` and ``mid_epoch``: the epoch's sample position and world size and
every rank's running loss sum / image / step counts, so the resumed epoch ends with the metrics of the
uninterrupted one.

They are written by rank 0 straight into the run directory (local, NFS or object store), not through Ray
Train's checkpoint manager: Ray keeps the best ``keep_checkpoints`` epoch checkpoints by ``val_top1`` plus the
latest, and a checkpoint without that score would push an epoch checkpoint out.  Here only the newest
mid-epoch checkpoint is kept (older ones are deleted after a new one is complete), and epoch checkpoints are
never touched.  Resume takes whichever complete checkpoint of the run directory records the latest
``(epoch, global_step)`` (:func:`newer_checkpoint`).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from ..rundir.checkpoints import checkpoint_failure_note, list_checkpoints, parse_checkpoint_name
from ..rundir.layout import CHECKPOINT_PREFIX
from ..rundir.storage import RunStorage
from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint_dir
from .protocols import CheckpointWriter

logger = logging.getLogger(__name__)

MID_EPOCH_KEY = "mid_epoch"
STEP_IN_EPOCH_KEY = "step_in_epoch"


def mid_epoch_dir_name(epoch: int, global_step: int) -> str:
    """``checkpoint_epoch{epochs completed:04d}_step{global step:06d}``."""
    return f"{CHECKPOINT_PREFIX}epoch{epoch:04d}_step{global_step:06d}"


def is_mid_epoch_name(name: str) -> bool:
    parsed = parse_checkpoint_name(name)
    return parsed is not None and parsed[1] >= 0


@dataclass(frozen=True)
class EpochProgress:
    """Every rank's part of the epoch so far (index = rank) and the epoch's position in its sample order."""

    step: int  # steps done in this epoch (also by ranks that skipped a non-finite one)
    samples: int  # entries of the epoch's sample order consumed by all ranks together
    world_size: int
    loss_sums: list[float]
    images: list[int]
    steps_done: list[int]  # optimizer steps taken (non-skipped), per rank

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "world_size": self.world_size,
                "loss_sums": self.loss_sums, "images": self.images, "steps_done": self.steps_done}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpochProgress:
        try:
            return cls(step=int(data["step"]), samples=int(data["samples"]), world_size=int(data["world_size"]),
                       loss_sums=[float(x) for x in data["loss_sums"]], images=[int(x) for x in data["images"]],
                       steps_done=[int(x) for x in data["steps_done"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"mid-epoch checkpoint meta has no usable '{MID_EPOCH_KEY}' record ({exc})") from exc

    def share_of(self, rank: int, world_size: int) -> tuple[float, int, int]:
        """(loss sum, images, optimizer steps) this rank continues from.  Same world size: its own; after a
        resize rank 0 carries the totals (the epoch's metrics are sums over ranks) and the others start at 0."""
        if world_size == self.world_size:
            return self.loss_sums[rank], self.images[rank], self.steps_done[rank]
        if rank == 0:
            return sum(self.loss_sums), sum(self.images), sum(self.steps_done)
        return 0.0, 0, 0


def write_mid_epoch_checkpoint(storage: RunStorage, name: str, write: CheckpointWriter) -> bool:
    """Write checkpoint ``name`` into the run directory (atomically locally; manifest last on object stores),
    then delete every older mid-epoch checkpoint.  Returns False (logged) when it could not be written."""
    try:
        storage.write_dir(name, write)
    except OSError as exc:
        logger.error("mid-epoch checkpoint %s NOT written (%s); %s", name, exc, checkpoint_failure_note(storage))
        return False
    for entry in list_checkpoints(storage):
        if entry.name != name and is_mid_epoch_name(entry.name):
            storage.delete_dir(entry.name)
    return True


def checkpoint_position(ckpt: LoadedCheckpoint | None) -> tuple[int, int]:
    if ckpt is None:
        return (-1, -1)
    return int(ckpt.meta.get("epoch", -1)), int(ckpt.meta.get("global_step", -1))


def newer_checkpoint(storage: RunStorage, than: LoadedCheckpoint | None) -> LoadedCheckpoint | None:
    """The newest valid checkpoint of the run directory, mid-epoch or epoch, recording a later position than
    ``than``; None if there is none.  Ray hands restarted workers only the checkpoints its manager registered:
    never a mid-epoch one, and not an epoch checkpoint that rank 0 completed just before a worker died, while
    its report was still on the way to the controller."""
    floor = checkpoint_position(than)
    for entry in list_checkpoints(storage):
        if tuple(entry.position) <= floor:
            break  # newest first: nothing further down is newer
        if not entry.meta_ok:
            continue
        tmp = None
        try:
            if storage.local:
                return load_checkpoint_dir(storage.path(entry.name))
            tmp = storage.temp_download(entry.name)
            return load_checkpoint_dir(tmp)
        except (CheckpointError, OSError) as exc:
            logger.warning("checkpoint %s unusable, using an earlier one: %s", entry.name, exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp.parent, ignore_errors=True)
    return None
