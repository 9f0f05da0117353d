"""The Tune trainable: one distributed DyRep training run (a Ray Train ``TorchTrainer``) per trial.

Train V2 has no ``Tuner(trainer)``: the trial launches its ``TorchTrainer`` itself and bridges metrics and
checkpoints to Tune.  Metrics flow: every worker calls ``ray.train.report`` -> the Train controller runs
:class:`~dyrep_ray.tune.bridge.BridgeCallback` with all ranks' metrics -> rank 0's metrics (and, under PBT, an
exported copy of the new checkpoint) go through a one-slot Ray queue -> :meth:`DyRepTrial.step` returns them
to Tune, one epoch per step -> schedulers (ASHA, PBT) and the trial's results.  ``TorchTrainer.fit()`` runs in
a helper thread of the trial actor.

It is a class trainable rather than a function trainable (``TuneReportCallback`` style) for two reasons:

* PBT needs *Tune* checkpoints; :meth:`save_checkpoint` writes one when Tune asks (at a perturbation, on a
  pause) from the latest exported DyRep checkpoint, and :meth:`load_checkpoint` turns a donor's checkpoint
  into the start of a new segment (see :mod:`dyrep_ray.tune.bridge`).
* When Tune stops (ASHA) or pauses (PBT) a trial, :meth:`cleanup` aborts the Train run *before* the trial
  actor exits.  A function trainable only learns of the stop from a ``SystemExit`` in its thread while the
  actor is already exiting; the Train controller it owns then dies abruptly and the workers' placement group
  stays reserved until the driver exits (Train's cleaner actor needs the state API / dashboard), so later
  trials starve -- measured here: two leaked 1-CPU placement groups per PBT exploit on a 4-CPU Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import tune

from ..console import LOG_FORMAT
from ..engine.config import TrainConfig
from ..rundir.storage import RunStorage
from .bridge import (
    BRIDGE_FILE,
    BridgeCallback,
    Segment,
    latest_origin,
    link_or_copy,
    plan_segment,
    start_checkpoint_of,
)
from .spec import SweepSpec

logger = logging.getLogger(__name__)

#: Logical CPUs the trial actor asks for: ~0, so trial actors never starve the Train workers they launch.
TRIAL_ACTOR_CPUS = 0.01
#: Seconds a stopped trial waits for its Train run to shut down (workers, placement group).
ABORT_TIMEOUT_S = 60
#: Seconds a finished trial waits for its Train run to end by itself before aborting it.
FINISH_TIMEOUT_S = 30
_DONE = "__dyrep_fit_done__"


class TrialError(RuntimeError):
    """A trial's training run failed; the message is one line naming the cause."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


def _root_cause(exc: BaseException) -> BaseException:
    """The worker exception inside Ray Train's TrainingFailedError, else ``exc``."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = failures[min(failures)]
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the user exception
    return cause if isinstance(cause, BaseException) else exc


def _uri(path: str | None, storage: RunStorage) -> str | None:
    if path is None or storage.local:
        return path
    return f"{storage.fs.type_name}://{path}"


def build_trainer(cfg: TrainConfig, segment: Segment, callback, callbacks: Sequence, cpus_per_worker: float):
    """The ``TorchTrainer`` of one segment: the same launcher, loop and run directory as ``dyrep-ray train``."""
    from ..distributed.trainer import Launch, build_torch_trainer, worker_count
    from .worker import segment_loop

    storage = RunStorage(segment.storage_uri, segment.name)
    launch = Launch(storage_uri=segment.storage_uri, name=segment.name, use_gpu=bool(cfg.use_gpu),
                    num_workers=worker_count(cfg), cpus_per_worker=cpus_per_worker,
                    start_checkpoint=_uri(segment.start_checkpoint, storage))
    return build_torch_trainer(cfg, launch, callbacks=callbacks, ray_callbacks=[callback], loop=segment_loop)


def _drain(queue) -> None:
    """Take (and drop) what the Train controller queued, so a report callback blocked on the queue returns."""
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get_nowait()
        except Empty:
            return
        if isinstance(item, dict) and item.get("export_dir"):
            shutil.rmtree(item["export_dir"], ignore_errors=True)


class DyRepTrial(tune.Trainable):
    """One trial = one (or, after PBT exploits, several consecutive) ``TorchTrainer`` run(s)."""

    def setup(self, config: dict, spec: SweepSpec, sweep_uri: str, callbacks: Sequence = (),
              train_log_level: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        if train_log_level is not None:  # read where this actor builds the trial's RunConfig (run_config_for)
            from ..distributed.console import RAY_TRAIN_LOG_LEVEL_ENV, quiet_exit_in_finalizers

            os.environ[RAY_TRAIN_LOG_LEVEL_ENV] = train_log_level
            quiet_exit_in_finalizers()  # Tune ends a stopped trial's actor with SIGTERM
        self.spec, self.sweep_uri, self.callbacks = spec, sweep_uri, tuple(callbacks)
        self.cfg = spec.trial_config(config)
        from ..engine.data_source import PARQUET

        if self.cfg.dataset == PARQUET:  # as dyrep-ray train: explicit val shards, never the training ones
            from ..data.parquet import resolve_parquet_splits

            self.cfg = self.cfg.replace(**resolve_parquet_splits(self.cfg.parquet_train, self.cfg.parquet_val))
        self.searched = {k: getattr(self.cfg, k) for k in spec.search_space}
        self.segment: Segment | None = None
        self._queue = None
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, BaseException] = {}
        self._controller = None
        self._extras: dict[str, Any] = {}
        self._last_metrics: dict | None = None
        self._latest_export: str | None = None
        self._finished = False

    # -- checkpoints (Tune side of the bridge) -------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_dir: str) -> None:
        # Runs before the first step; a donor's checkpoint is copied into a new segment right here.
        self.segment = plan_segment(self.sweep_uri, self.trial_id, checkpoint_dir, self.searched)

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        target = Path(checkpoint_dir)
        if self._latest_export and Path(self._latest_export).is_dir():
            for item in Path(self._latest_export).iterdir():
                link_or_copy(item, target / item.name)
        else:  # nothing exported (no PBT, or no checkpoint yet): a pointer to our run, enough to resume it
            epoch = int((self._last_metrics or {}).get("epoch", 0))
            (target / BRIDGE_FILE).write_text(json.dumps({
                "trial_id": self.trial_id, "segment": self.segment.index if self.segment else 0,
                "run_dir": self.segment.run_dir if self.segment else None, "epoch": epoch}, indent=1))
        return checkpoint_dir

    # -- training ------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from ray.util.queue import Queue

        if self.segment is None:
            self.segment = plan_segment(self.sweep_uri, self.trial_id, None, self.searched)
        self.segment.start_checkpoint = start_checkpoint_of(self.segment)
        n_exploits, origin = latest_origin(self.sweep_uri, self.trial_id)
        self._extras = {"segment": self.segment.index, "run_dir": self.segment.run_dir, "pbt_exploits": n_exploits}
        if origin:
            self._extras.update(pbt_donor=origin["donor_trial_id"], pbt_donor_epoch=origin["donor_epoch"])
        logger.info("trial %s: segment %d in %s%s; %s", self.trial_id, self.segment.index, self.segment.run_dir,
                    f", starting from {self.segment.start_checkpoint}" if self.segment.start_checkpoint else "",
                    ", ".join(f"{k}={v}" for k, v in self.searched.items()))
        self._queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        callback = BridgeCallback(self._queue, self.trial_id, self.segment.index, self.segment.run_dir,
                                  export=self.spec.scheduler_type == "pbt")
        trainer = build_trainer(self.cfg, self.segment, callback, self.callbacks, self.spec.cpus_per_worker)
        queue, outcome = self._queue, self._outcome

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 -- re-raised by step()
                outcome["error"] = exc
            finally:
                try:
                    queue.put(_DONE, block=True, timeout=ABORT_TIMEOUT_S)
                except Exception:  # nobody listens any more (the trial is stopping)
                    pass

        self._thread = threading.Thread(target=fit, name=f"dyrep-fit-{self.trial_id}", daemon=True)
        self._thread.start()

    def _final_metrics_from_run(self) -> dict:
        from ..rundir.files import read_metrics

        lines = read_metrics(RunStorage(self.segment.storage_uri, self.segment.name))
        if not lines:
            return {}
        last = lines[-1]
        return {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))}

    def step(self) -> dict:
        if self._thread is None:
            self._start()
        item = self._queue.get(block=True)
        if item == _DONE:
            self._thread.join()
            self._finished = True
            if "error" in self._outcome:
                cause = _root_cause(self._outcome["error"])
                raise TrialError(f"trial {self.trial_id} failed: {_first_line(cause)}") from self._outcome["error"]
            # The run ended without a new epoch (e.g. restored from a checkpoint of its last epoch).
            return {**(self._last_metrics or self._final_metrics_from_run()), **self._extras, "done": True}
        self._controller = item.pop("controller", None) or self._controller
        metrics = {**item["metrics"], **self._extras}
        if item["checkpoint_path"]:
            metrics["dyrep_checkpoint"] = item["checkpoint_path"]
        if item.get("export_dir"):
            if self._latest_export:
                shutil.rmtree(self._latest_export, ignore_errors=True)
            self._latest_export = item["export_dir"]
        self._last_metrics = metrics
        if int(metrics.get("epoch", 0)) >= self.cfg.epochs:
            self._finished = True
            metrics["done"] = True
        return metrics

    def cleanup(self) -> None:
        """Runs when Tune stops, pauses or finishes the trial: the Train run must not outlive it."""
        import ray

        thread = self._thread
        if thread is not None and thread.is_alive():
            if self._finished:
                thread.join(timeout=FINISH_TIMEOUT_S)
            if thread.is_alive():
                deadline = time.monotonic() + ABORT_TIMEOUT_S
                ref = self._controller.abort.remote() if self._controller is not None else None
                while time.monotonic() < deadline and (thread.is_alive() or ref is not None):
                    _drain(self._queue)  # the controller may be blocked putting the next epoch
                    if ref is not None and ray.wait([ref], timeout=0.2)[0]:
                        ref = None
                    thread.join(timeout=0.2)
                if thread.is_alive():
                    logger.warning("trial %s: its Train run did not stop within %ds", self.trial_id, ABORT_TIMEOUT_S)
                else:
                    logger.info("trial %s: Train run stopped", self.trial_id)
        if self._latest_export:
            shutil.rmtree(self._latest_export, ignore_errors=True)
            self._latest_export = None
        # Our actor handles are released here, not in a finalizer when Ray ends this actor with SIGTERM.
        self._controller = self._queue = None


def make_trainable(spec: SweepSpec, sweep_uri: str, callbacks: Sequence = (), train_log_level: str | None = None):
    """The Tune trainable of a sweep: :class:`DyRepTrial` with its parameters, on a ~0-CPU trial actor.

    ``callbacks``: :class:`~dyrep_ray.engine.callbacks.TrainerCallback` instances every trial's workers run.
    ``train_log_level``: the console level of every trial's Ray Train controller (None: Ray's default).
    """
    trainable = tune.with_parameters(DyRepTrial, spec=spec, sweep_uri=sweep_uri, callbacks=tuple(callbacks),
                                     train_log_level=train_log_level)
    return tune.with_resources(trainable, {"CPU": TRIAL_ACTOR_CPUS})
