"""The Tune function trainable: one distributed DyRep training run (a ``TorchTrainer``) per trial.

Train V2 has no ``Tuner(trainer)``; a function trainable launches the ``TorchTrainer`` itself.  Metrics flow:
every worker calls ``ray.train.report`` -> the Train controller runs :class:`~.bridge.BridgeCallback` with all
ranks' metrics -> rank 0's metrics (plus an exported checkpoint under PBT) go through a one-slot Ray queue to
this function -> ``ray.tune.report`` -> schedulers (ASHA, PBT) and the trial's Tune results.
``TorchTrainer.fit()`` runs in a helper thread so the trial's own thread can do the reporting: a Tune
checkpoint can only be registered by ``ray.tune.report`` from the trial's function, which is exactly what
``TuneReportCallback`` (metrics only) cannot do.

When Tune stops the trial (ASHA), ``ray.tune.report`` ends this function; the trial actor exits and the Train
controller and workers it owns go with it (Ray fate-sharing).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, Optional

from ..distributed.trainer import CPUS_PER_WORKER, LOG_FORMAT, train_loop_per_worker
from ..engine.config import TrainConfig
from ..engine.storage import RunStorage
from .bridge import _DONE, BridgeCallback, Segment, latest_origin, plan_segment, start_checkpoint_of
from .spec import SweepSpec

logger = logging.getLogger(__name__)

#: Logical CPUs the trial actor asks for: ~0, so trial actors never starve the Train workers they launch.
TRIAL_ACTOR_CPUS = 0.01
#: Seconds a stopped trial waits for its Train run to shut down (workers, placement group).
ABORT_TIMEOUT_S = 60


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


def preflight(cfg: TrainConfig) -> None:
    """Names we can check without data or workers (fails the trial at once, with a clear message)."""
    from ..data import check_dataset_name
    from ..models import build_model

    check_dataset_name(cfg.dataset)
    build_model(cfg.model, cfg.num_classes or 10)


def _storage_uri_for_workers(segment: Segment) -> str:
    storage = RunStorage(segment.storage_uri, segment.name)
    return storage.root.rsplit("/", 1)[0] if storage.local else segment.storage_uri


def _uri(path: Optional[str], storage: RunStorage) -> Optional[str]:
    if path is None or storage.local:
        return path
    return f"{storage.fs.type_name}://{path}"


def _drain(queue) -> None:
    """Take (and drop) what the Train controller queued, so its blocked report callback returns."""
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get_nowait()
        except Empty:
            return
        if isinstance(item, dict) and item.get("export_dir"):
            shutil.rmtree(item["export_dir"], ignore_errors=True)


def stop_run_in_background(trial_id: str, controller, queue, fit_thread: threading.Thread) -> threading.Thread:
    """Abort the trial's Train run cleanly when Tune stops or pauses the trial.

    Without this the trial actor exits, the Train controller it owns dies with it, and the workers' placement
    group stays reserved until the driver exits (Train's cleaner needs the state API, often unavailable), so
    later trials starve.  The thread is not a daemon: the trial actor's process waits for it before exiting.
    """
    import ray

    def stop() -> None:
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        ref = controller.abort.remote() if controller is not None else None
        while time.monotonic() < deadline and (fit_thread.is_alive() or ref is not None):
            _drain(queue)  # the controller may be blocked putting the next epoch into the full queue
            if ref is not None and ray.wait([ref], timeout=0.2)[0]:
                ref = None
            fit_thread.join(timeout=0.2)
        if fit_thread.is_alive():
            logger.warning("trial %s: its Train run did not stop within %ds", trial_id, ABORT_TIMEOUT_S)
        else:
            logger.info("trial %s: Train run stopped (Tune stopped or paused the trial)", trial_id)

    thread = threading.Thread(target=stop, name=f"dyrep-stop-{trial_id}", daemon=False)
    thread.start()
    return thread


def build_trainer(cfg: TrainConfig, segment: Segment, callback, fault: Optional[str]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..engine.storage import resolve_filesystem

    storage = RunStorage(segment.storage_uri, segment.name)
    storage_uri = _storage_uri_for_workers(segment)
    fs, fs_path = resolve_filesystem(storage_uri)
    use_gpu = bool(cfg.use_gpu)
    per_worker = {"CPU": CPUS_PER_WORKER} if not use_gpu else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "storage_uri": storage_uri, "name": segment.name,
                           "fault": fault, "start_checkpoint": _uri(segment.start_checkpoint, storage)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=segment.name,
            storage_path=fs_path,
            storage_filesystem=None if storage.local else fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            callbacks=[callback],
        ),
    )


def run_trial(config: dict, spec: SweepSpec, sweep_uri: str, fault: Optional[str] = None) -> None:
    """The function trainable (``config`` = this trial's sampled values, possibly PBT-mutated)."""
    from ray import tune
    from ray.util.queue import Queue

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    trial_id = tune.get_context().get_trial_id()
    cfg = spec.trial_config(config)
    preflight(cfg)
    searched = {k: getattr(cfg, k) for k in spec.search_space}
    segment = plan_segment(sweep_uri, trial_id, tune.get_checkpoint(), searched)
    segment.start_checkpoint = start_checkpoint_of(segment)
    n_exploits, origin = latest_origin(sweep_uri, trial_id)
    extras: dict[str, Any] = {"segment": segment.index, "run_dir": segment.run_dir, "pbt_exploits": n_exploits}
    if origin:
        extras.update(pbt_donor=origin["donor_trial_id"], pbt_donor_epoch=origin["donor_epoch"])
    logger.info("trial %s: segment %d in %s%s; %s", trial_id, segment.index, segment.run_dir,
                f", starting from {segment.start_checkpoint}" if segment.start_checkpoint else "",
                ", ".join(f"{k}={v}" for k, v in searched.items()))

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    export = spec.scheduler_type == "pbt"
    callback = BridgeCallback(queue, trial_id, segment.index, segment.run_dir, export)
    trainer = build_trainer(cfg, segment, callback, fault)
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the trial thread below
            outcome["error"] = exc
        finally:
            try:
                queue.put(_DONE, block=True, timeout=ABORT_TIMEOUT_S)
            except Exception:  # the trial stopped listening (or is gone)
                pass

    thread = threading.Thread(target=fit, name=f"dyrep-fit-{trial_id}", daemon=True)
    thread.start()
    controller = None
    try:
        while True:
            item = queue.get(block=True)
            if item == _DONE:
                break
            controller = item.pop("controller", None) or controller
            metrics = {**item["metrics"], **extras}
            if item["checkpoint_path"]:
                metrics["dyrep_checkpoint"] = item["checkpoint_path"]
            export_dir = item.get("export_dir")
            try:
                checkpoint = tune.Checkpoint.from_directory(export_dir) if export_dir else None
                tune.report(metrics, checkpoint=checkpoint)  # raises SystemExit when Tune stops/pauses us
            finally:
                if export_dir:
                    shutil.rmtree(export_dir, ignore_errors=True)
    except SystemExit:
        stop_run_in_background(trial_id, controller, queue, thread)
        raise
    thread.join()
    if "error" in outcome:
        cause = _root_cause(outcome["error"])
        raise TrialError(f"trial {trial_id} failed: {_first_line(cause)}") from outcome["error"]


def make_trainable(spec: SweepSpec, sweep_uri: str, fault: Optional[str] = None):
    """The Tune trainable of a sweep: :func:`run_trial` with its parameters, on a ~0-CPU trial actor."""
    from ray import tune

    trainable = tune.with_parameters(run_trial, spec=spec, sweep_uri=sweep_uri, fault=fault)
    return tune.with_resources(trainable, {"CPU": TRIAL_ACTOR_CPUS})


def default_fault() -> Optional[str]:
    from ..engine.faults import FAULT_ENV

    return os.environ.get(FAULT_ENV)

