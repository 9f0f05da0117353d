"""The PBT checkpoint bridge between Ray Train runs and Ray Tune trials.

Ray Train V2 runs one ``TorchTrainer`` per trial; its checkpoints (``checkpoint_epochNNNN/``: structure graph,
tensors, meta, manifest) live in the trial's run directory and are unknown to Tune.  PBT needs *Tune*
checkpoints: it clones the last checkpoint a strong trial reported into a weak one.  The bridge:

1. :class:`BridgeCallback` runs in the Train controller after every ``ray.train.report``.  It hands rank 0's
   metrics to the trial's function trainable through a Ray queue and -- when a dyrep checkpoint was persisted
   and exports are on (PBT) -- first copies that checkpoint (hard links when possible) plus ``bridge.json``
   (trial, segment, epoch, source path, sha256 of structure and state) into a temp dir.  Doing it inside the
   callback means the Train checkpoint manager cannot delete the checkpoint before it is copied.
2. The trial (:class:`~dyrep_ray.tune.trainable.DyRepTrial`) returns the metrics to Tune epoch by epoch and,
   when Tune asks it to save (PBT at a perturbation, a pause), writes the latest exported copy as the Tune
   checkpoint.
3. When PBT restores a trial from a *donor's* Tune checkpoint, :func:`plan_segment` opens a new segment
   ``<trial>/seg<N>/``, copies the donor checkpoint into it (``start_checkpoint/``), records where it came from
   in ``pbt_origin.json``, and the next ``TorchTrainer`` run starts from it: the donor's structure graph (grown
   blocks, cut branches), weights, optimizer state, epoch and history, with this trial's (mutated) config.
   A restore from the trial's *own* checkpoint (PBT pause, retry, ``--resume``) re-runs the segment it names;
   Ray Train resumes it from its newest checkpoint.

Segment 0 of a trial is the trial directory itself, so a trial that is never exploited has exactly the run
directory of ``dyrep-ray train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from ..rundir.layout import (
    BRIDGE_FILE,
    GRAPH_FILE,
    MANIFEST_FILE,
    META_FILE,
    PREEMPTED_METRIC,
    SEGMENT_PREFIX,
    START_CHECKPOINT_DIR,
    STATE_FILE,
)
from ..rundir.layout import PBT_ORIGIN_FILE as ORIGIN_FILE
from ..rundir.storage import RunStorage, resolve_filesystem

logger = logging.getLogger(__name__)

# The files of a DyRep checkpoint (dyrep_ray.engine.checkpoint; not imported here, it pulls in torch).
CHECKPOINT_FILES = (STATE_FILE, META_FILE, GRAPH_FILE, MANIFEST_FILE)


def verify_checkpoint_dir(directory: str | Path) -> None:
    from ..engine.checkpoint import verify_checkpoint_dir as verify

    verify(directory)


def graph_sha256(graph: Any) -> str:
    """Digest of a structure graph (canonical JSON): equal digests = identical structures."""
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()


def checkpoint_fingerprint(directory: str | Path) -> dict:
    """``{"epoch", "graph_sha256", "state_sha256"}`` of a verified dyrep checkpoint directory."""
    directory = Path(directory)
    verify_checkpoint_dir(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    meta = json.loads((directory / META_FILE).read_text())
    return {"epoch": int(meta["epoch"]),
            "graph_sha256": graph_sha256(json.loads((directory / GRAPH_FILE).read_text())),
            "state_sha256": manifest["files"][STATE_FILE]["sha256"]}


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # checkpoint files are immutable once written: a hard link is a free copy
    except OSError:
        shutil.copy2(src, dst)


def copy_checkpoint(src: str, dst: Path, filesystem=None) -> None:
    """Copy a dyrep checkpoint directory (local path, or path on ``filesystem``) to the local ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    import pyarrow.fs as pafs

    fs = filesystem
    if fs is None:
        fs, src = resolve_filesystem(src)
    if isinstance(fs, pafs.LocalFileSystem):
        for name in CHECKPOINT_FILES:
            link_or_copy(Path(src) / name, dst / name)
    else:
        pafs.copy_files(src, str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    verify_checkpoint_dir(dst)


# ---------------------------------------------------------------------------------------------------------------
# Train controller side
# ---------------------------------------------------------------------------------------------------------------

class BridgeCallback(UserCallback):
    """Forward rank 0's metrics (and, with ``export``, a copy of the new checkpoint) to the trial.

    Runs in the Ray Train controller actor, on the node of the trial actor (Train V2 pins it there).  The queue
    holds one item, so training waits for Tune to take each epoch's report, as ``TuneReportCallback`` does.
    """

    def __init__(self, queue, trial_id: str, segment: int, run_dir: str, export: bool):
        self.queue, self.trial_id, self.segment = queue, trial_id, segment
        self.run_dir, self.export = run_dir, export
        self._sent_controller = False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if PREEMPTED_METRIC in metrics[0]:
            # The barrier after a preemption checkpoint, mid-epoch: no validation metric, and its "epoch" is the
            # unfinished one.  Tune sees the epoch when the restarted run finishes it.
            return
        item = {"metrics": dict(metrics[0]), "checkpoint_path": None, "export_dir": None}
        if not self._sent_controller:  # lets the trial abort this run cleanly when Tune stops or pauses it
            import ray

            item["controller"] = ray.get_runtime_context().current_actor
            self._sent_controller = True
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
            if self.export:
                item["export_dir"] = self._export(checkpoint)
        self.queue.put(item, block=True)

    def _export(self, checkpoint) -> str | None:
        tmp = Path(tempfile.mkdtemp(prefix="dyrep-tune-ckpt-"))
        try:
            copy_checkpoint(checkpoint.path, tmp, filesystem=checkpoint.filesystem)
            info = {"trial_id": self.trial_id, "segment": self.segment, "run_dir": self.run_dir,
                    "source": checkpoint.path, **checkpoint_fingerprint(tmp), "time": time.time()}
            (tmp / BRIDGE_FILE).write_text(json.dumps(info, indent=1))
            return str(tmp)
        except Exception as exc:  # a failed export must not kill training; PBT skips this trial as a donor
            logger.error("could not export checkpoint %s for Tune (%s)", checkpoint.path, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            return None


# ---------------------------------------------------------------------------------------------------------------
# Trial (function trainable) side
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """Where the next ``TorchTrainer`` run of a trial lives and what it starts from."""

    index: int
    storage_uri: str  # Ray Train storage_path of this run
    name: str  # Ray Train run name; run dir = <storage_uri>/<name>
    start_checkpoint: str | None = None  # a dyrep checkpoint dir the run starts from (PBT exploit)
    origin: dict = field(default_factory=dict)  # pbt_origin.json contents for exploited segments

    @property
    def run_dir(self) -> str:
        return RunStorage(self.storage_uri, self.name).root


def segment_storage(sweep_uri: str, trial_id: str, index: int) -> RunStorage:
    return RunStorage(sweep_uri, trial_id) if index == 0 else RunStorage(f"{sweep_uri}/{trial_id}",
                                                                          f"{SEGMENT_PREFIX}{index}")


def _segment(sweep_uri: str, trial_id: str, index: int, **kwargs) -> Segment:
    if index == 0:
        return Segment(0, sweep_uri, trial_id, **kwargs)
    return Segment(index, f"{sweep_uri}/{trial_id}", f"{SEGMENT_PREFIX}{index}", **kwargs)


def existing_segments(sweep_uri: str, trial_id: str) -> list[int]:
    """Indices of the trial's segments on storage (0 = the trial dir itself, when it exists)."""
    trial = RunStorage(sweep_uri, trial_id)
    found = [int(m.group(1)) for d in trial.list_dirs(SEGMENT_PREFIX)
             if (m := re.fullmatch(rf"{SEGMENT_PREFIX}(\d+)", d))]
    root_exists = trial.fs.get_file_info(trial.root).type.name == "Directory"
    return sorted(({0} if root_exists else set()) | set(found))


def read_origin(sweep_uri: str, trial_id: str, index: int) -> dict:
    if index == 0:
        return {}
    text = segment_storage(sweep_uri, trial_id, index).read_text(ORIGIN_FILE)
    return json.loads(text) if text else {}


def latest_origin(sweep_uri: str, trial_id: str) -> tuple[int, dict]:
    """(number of exploits, origin of the latest exploited segment or {})."""
    segments = [s for s in existing_segments(sweep_uri, trial_id) if s > 0]
    return len(segments), (read_origin(sweep_uri, trial_id, segments[-1]) if segments else {})


def read_bridge(checkpoint_dir: str | Path | None) -> dict:
    """``bridge.json`` of a Tune checkpoint directory ({} when absent)."""
    if checkpoint_dir is None:
        return {}
    path = Path(checkpoint_dir) / BRIDGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _same_donor(origin: dict, info: dict) -> bool:
    return bool(origin) and (origin.get("donor_trial_id"), origin.get("donor_epoch"), origin.get("state_sha256")) == (
        info.get("trial_id"), info.get("epoch"), info.get("state_sha256"))


def plan_segment(sweep_uri: str, trial_id: str, checkpoint_dir: str | Path | None, searched: dict) -> Segment:
    """Choose the segment the trial runs next (see module docstring).

    ``checkpoint_dir`` is the (local copy of the) Tune checkpoint the trial is restored from, ``None`` on a
    fresh start; ``searched`` is this trial's current values of the searched keys (kept in ``pbt_origin.json``).
    Call it while ``checkpoint_dir`` exists: a donor's checkpoint is copied into the new segment right away.
    """
    segments = existing_segments(sweep_uri, trial_id)
    newest = segments[-1] if segments else 0
    info = read_bridge(checkpoint_dir)
    if checkpoint_dir is not None and not info:
        logger.warning("Tune checkpoint %s has no %s; continuing the newest segment", checkpoint_dir, BRIDGE_FILE)
    if not info:  # fresh start, or a restart without checkpoint: continue the newest segment (Train resumes it)
        return _segment(sweep_uri, trial_id, newest)
    if info["trial_id"] == trial_id:  # our own checkpoint: Ray Train resumes that segment's run
        return _segment(sweep_uri, trial_id, int(info["segment"]))
    # A donor's checkpoint: a PBT exploit. Reuse the segment already opened for this very checkpoint (the trial
    # was restarted before it saved a checkpoint of its own), else open a new one.
    origin = read_origin(sweep_uri, trial_id, newest)
    if _same_donor(origin, info):
        logger.info("trial %s: continuing segment %d (started from %s epoch %d)", trial_id, newest,
                    origin["donor_trial_id"], origin["donor_epoch"])
        return _segment(sweep_uri, trial_id, newest, origin=origin)
    if "state_sha256" not in info:
        raise RuntimeError(f"Tune checkpoint {checkpoint_dir} of trial {info['trial_id']} holds no DyRep "
                           f"checkpoint to exploit")
    index = newest + 1
    segment = _segment(sweep_uri, trial_id, index)
    storage = RunStorage(segment.storage_uri, segment.name)
    local_start = Path(tempfile.mkdtemp(prefix="dyrep-start-")) / START_CHECKPOINT_DIR
    try:
        copy_checkpoint(str(checkpoint_dir), local_start)
        fingerprint = checkpoint_fingerprint(local_start)
        if (fingerprint["graph_sha256"], fingerprint["state_sha256"]) != (info["graph_sha256"], info["state_sha256"]):
            raise RuntimeError(f"donor checkpoint {checkpoint_dir} does not match its {BRIDGE_FILE}")
        storage.upload_dir(local_start, START_CHECKPOINT_DIR)
    finally:
        shutil.rmtree(local_start.parent, ignore_errors=True)
    origin = {"segment": index, "trial_id": trial_id, "donor_trial_id": info["trial_id"],
              "donor_segment": int(info["segment"]), "donor_epoch": int(info["epoch"]),
              "donor_checkpoint": info["source"], "donor_run_dir": info.get("run_dir"),
              "graph_sha256": info["graph_sha256"], "state_sha256": info["state_sha256"],
              "config": searched, "time": time.time()}
    storage.write_text(ORIGIN_FILE, json.dumps(origin, indent=1))
    logger.info("trial %s: PBT exploit of %s at epoch %d -> segment %d (%s)", trial_id, info["trial_id"],
                info["epoch"], index, storage.root)
    segment.origin = origin
    return segment


def start_checkpoint_of(segment: Segment) -> str | None:
    """Path of the segment's ``start_checkpoint/`` (exploited segments), else None."""
    if segment.index == 0:
        return None
    storage = RunStorage(segment.storage_uri, segment.name)
    info = storage.fs.get_file_info(storage.path(f"{START_CHECKPOINT_DIR}/{MANIFEST_FILE}"))
    return storage.path(START_CHECKPOINT_DIR) if info.type.name == "File" else None
