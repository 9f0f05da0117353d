"""Ray Train implementation of the training-loop context (:class:`~dyrep_ray.engine.protocols.TrainContext`).

Every structure change is decided once: rank 0's plan is broadcast with
``broadcast_object_list``; after the change the model is re-wrapped in DDP, whose
constructor broadcasts rank 0's parameters and buffers, so replicas are
bit-identical.  Every rank calls ``ray.train.report``; only rank 0 attaches the
checkpoint, written atomically to a local temp dir and persisted by Ray.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint_dir
from ..engine.context import load_newest_valid
from ..engine.midepoch import newer_checkpoint
from ..engine.progress import EVENTS_TEXT, event_labels
from ..engine.protocols import CheckpointWriter
from ..rundir.checkpoints import checkpoint_failure_note
from ..rundir.layout import checkpoint_dir_name
from ..rundir.storage import RunStorage

logger = logging.getLogger(__name__)


def _scalar_metrics(metrics: dict) -> dict:
    """Ray metrics stay flat scalars (Tune schedulers compare them); events travel as a count."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    flat["n_events"] = len(metrics.get("events", []))
    flat[EVENTS_TEXT] = ", ".join(event_labels(metrics))  # the tune console's epoch lines show them
    return flat


class RayTrainContext:
    def __init__(self, storage_uri: str, name: str, start_checkpoint: str | None = None):
        """``start_checkpoint``: a dyrep checkpoint dir (path or URI) a *new* run starts from (PBT exploit)."""
        ctx = ray.train.get_context()
        self.start_checkpoint = start_checkpoint
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.storage = RunStorage(storage_uri, name)
        self.node_id = ray.get_runtime_context().get_node_id()  # recorded per rank: placement across nodes
        self._distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        # Remote storage: Ray uploads epoch checkpoints in its background thread, off the training path.
        self.upload_mode = CheckpointUploadMode.SYNC if self.storage.local else CheckpointUploadMode.ASYNC
        self._async_dirs: list[Path] = []  # temp parents of checkpoints Ray uploads (and then deletes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not self._distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def broadcast_object(self, obj):
        if not self._distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list:
        if not self._distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def resume_checkpoint(self) -> LoadedCheckpoint | None:
        """Latest checkpoint Ray hands us; if it is corrupt, the newest valid one in the run dir; if the run
        has none, ``start_checkpoint``."""
        checkpoint = ray.train.get_checkpoint()
        bad = None
        if checkpoint is not None:
            try:
                with checkpoint.as_directory() as directory:
                    loaded = load_checkpoint_dir(directory)
                # a later checkpoint in the run dir (mid-epoch, or an epoch one Ray had not registered) is
                # where we stand
                return newer_checkpoint(self.storage, loaded) or loaded
            except (CheckpointError, OSError) as exc:
                bad = Path(checkpoint.path).name
                logger.warning("latest Ray checkpoint unusable (%s); looking for an earlier valid one", exc)
        newest = load_newest_valid(self.storage, skip=bad)
        if newest is None and self.start_checkpoint:  # nothing of our own yet: start from the given one
            with Checkpoint(self.start_checkpoint).as_directory() as directory:
                return load_checkpoint_dir(directory)
        return newest

    def report(self, metrics: dict, epoch: int, write_checkpoint: CheckpointWriter | None) -> None:
        checkpoint, tmp = None, None
        for done in [d for d in self._async_dirs if not (d / "checkpoint").exists()]:
            shutil.rmtree(done, ignore_errors=True)  # Ray deleted its upload source: drop the empty parent
            self._async_dirs.remove(done)
        if self.rank == 0 and write_checkpoint is not None:
            tmp = Path(tempfile.mkdtemp(prefix="dyrep-ckpt-"))
            try:
                write_checkpoint(tmp / "checkpoint")
                checkpoint = Checkpoint.from_directory(str(tmp / "checkpoint"))
            except OSError as exc:
                logger.error("checkpoint for epoch %d NOT written (%s); %s", epoch, exc,
                             checkpoint_failure_note(self.storage))
        try:
            # Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint.
            ray.train.report(_scalar_metrics(metrics), checkpoint=checkpoint,
                             checkpoint_dir_name=checkpoint_dir_name(epoch) if checkpoint is not None else None,
                             checkpoint_upload_mode=self.upload_mode)
        finally:
            if tmp is not None and checkpoint is not None and self.upload_mode == CheckpointUploadMode.ASYNC:
                self._async_dirs.append(tmp)  # still being uploaded; Ray deletes the checkpoint dir after
            elif tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
