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
from typing import Any, Optional

from ..distributed.trainer import CPUS_PER_WORKER, LOG_FORMAT, train_loop_per_worker
from ..engine.config import TrainConfig
from ..engine.storage import RunStorage
from .bridge import _DONE, BridgeCallback, Segment, latest_origin, plan_segment, start_checkpoint_of
from .spec import SweepSpec

logger = logging.getLogger(__name__)

#: Logical CPUs the trial actor asks for: ~0, so trial actors never starve the Train workers they launch.
TRIAL_ACTOR_CPUS = 0.01


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
                queue.put(_DONE, block=True)
            except Exception:  # the trial (and its queue actor) may already be gone
                pass

    thread = threading.Thread(target=fit, name=f"dyrep-fit-{trial_id}", daemon=True)
    thread.start()
    while True:
        item = queue.get(block=True)
        if item == _DONE:
            break
        metrics = {**item["metrics"], **extras}
        if item["checkpoint_path"]:
            metrics["dyrep_checkpoint"] = item["checkpoint_path"]
        export_dir = item.get("export_dir")
        try:
            checkpoint = tune.Checkpoint.from_directory(export_dir) if export_dir else None
            tune.report(metrics, checkpoint=checkpoint)  # ends this function when Tune stops the trial
        finally:
            if export_dir:
                shutil.rmtree(export_dir, ignore_errors=True)
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

