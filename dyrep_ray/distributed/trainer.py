"""Driver side of distributed training: connect to Ray, launch a ``TorchTrainer``, summarize.

``train_loop_per_worker`` is the one function every Ray Train worker runs; it
builds a :class:`~dyrep_ray.distributed.context.RayTrainContext` and runs the same
loop as ``--local``.  Re-running with the same output dir and name resumes: Ray
Train restores its checkpoint manager from ``<output>/<name>`` and hands the
latest checkpoint to the workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import LOG_FORMAT
from ..engine.assembly import check_resume_config
from ..engine.callbacks import TrainerCallback
from ..engine.config import TrainConfig
from ..engine.context import load_newest_valid
from ..engine.data_source import PARQUET, aug_options
from ..engine.loop import Trainer
from ..engine.summary import summarize
from ..errors import UserError
from ..rundir.files import plain_params_from, read_metrics
from ..rundir.storage import RunStorage, resolve_filesystem
from ..tracking import DriverTrackingEnvironment
from .console import WorkerConsole, ray_train_log_level

logger = logging.getLogger(__name__)

__all__ = ["ClusterError", "build_torch_trainer", "connect", "preflight", "read_metrics", "plain_params_from",
           "run_distributed", "train_loop_per_worker"]

CPUS_PER_WORKER = 1
#: Ray Train scores checkpoints by this metric when it keeps the best N.
CHECKPOINT_SCORE = "val_top1"
#: A worker count, or (min, max) for elastic training (``workers: [min, max]``; ScalingConfig takes either).
WorkerCount = int | tuple[int, int]
#: Elastic runs: how often Ray Train looks for capacity to grow into (Ray's default is 60 s, which is what a
#: grown-back node waits at worst; a poll is one look at the cluster's resources, cheap at 10 s).
ELASTIC_RESIZE_MONITOR_INTERVAL_S = 10.0
#: Environment override of the interval when the config key is null (tests shrink it to seconds).
ELASTIC_RESIZE_ENV = "DYREP_RAY_ELASTIC_RESIZE_INTERVAL_S"
#: Preemptions (drains with notice) are retried without limit: they are planned, not failures.
MAX_PREEMPTION_FAILURES = -1


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run this job as requested (one-line, user-fixable)."""


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: the ``--local`` loop in a Ray context, on Ray Data or torch data."""
    from .context import RayTrainContext

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    callbacks = list(loop_config.get("callbacks", ()))
    for callback in callbacks:  # before anything logs or tracks: the terminal output, the driver's settings
        if isinstance(callback, WorkerConsole | DriverTrackingEnvironment):
            callback.configure()
    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = RayTrainContext(loop_config["storage_uri"], loop_config["name"],
                          start_checkpoint=loop_config.get("start_checkpoint"))
    if ctx.rank != 0:  # one progress log is enough
        logging.getLogger("dyrep_ray").setLevel(logging.WARNING)
    if ctx.rank == 0:  # tracking runs on rank 0 only (the callbacks also switch themselves off elsewhere)
        from ..tracking import build_tracking_callbacks

        callbacks += build_tracking_callbacks(cfg)
    data = None
    if loop_config.get("ray_data"):  # the launcher gave the trainer Ray Data datasets: read this worker's shards
        from .ray_data import RayDataSource

        data = RayDataSource.from_ray_train
    Trainer.from_config(cfg, ctx, data=data, callbacks=callbacks).fit()


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Attach to an existing cluster (``address``, ``RAY_ADDRESS`` or inside ``ray job submit``) or start one;
    refuse (:class:`ClusterError`) a cluster whose recorded state API another Ray instance answers."""
    import ray

    from .state_api import foreign_state_api, foreign_state_api_error

    started = _connect(address, num_cpus)
    gcs_address = ray.get_runtime_context().gcs_address
    if gcs_address not in _STATE_API_CHECKED:  # once per cluster and process: the CLI connects, then its run
        url = foreign_state_api()
        if url is not None:
            raise ClusterError(foreign_state_api_error(url))
        _STATE_API_CHECKED.add(gcs_address)
    return started


_STATE_API_CHECKED: set[str] = set()


def _connect(address: str | None, num_cpus: int | None) -> str:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return "existing"
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
            return address
        from .ray_local import recorded_local_cluster, stale_local_cluster
        from .state_api import own_state_api

        stale = stale_local_cluster()  # a head that died without `ray stop`: ray.init would retry it for minutes
        if stale is not None:
            logger.warning("%s names a Ray head at %s that does not answer (it died without 'ray stop'); "
                           "starting a fresh local instance", *stale)
        if stale is None and recorded_local_cluster() is not None:  # `ray start`'s head on this machine: join it
            ray.init(num_cpus=num_cpus, log_to_driver=True)
            return "local"
        with own_state_api() as state_api:
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, **state_api)
        return "local"
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local instance"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterError(f"cannot connect to Ray at {where} ({reason}); "
                           "check --address / RAY_ADDRESS, that the head is running, and RAY_AUTH_MODE=token "
                           "with a valid token") from exc


REACH_TIMEOUT_S = 5.0


def check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` Ray address does not answer."""
    import socket
    from urllib.parse import urlparse

    if address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(f"Ray cluster at {address} is unreachable ({exc.strerror or exc}); start it with "
                           "'ray start --head' or fix --address / RAY_ADDRESS") from exc


def resolve_use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def check_resources(cfg: TrainConfig, use_gpu: bool) -> None:
    """The fewest workers the run needs (``workers``, or an elastic run's min) must fit the cluster now;
    an elastic max beyond it is what the run grows into when nodes join."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need = cfg.min_workers
    what = f"an elastic run's minimum of {need}" if cfg.elastic else f"{need}"
    fix_elastic = f" or lower the minimum of workers=[{cfg.min_workers},{cfg.max_workers}]" if cfg.elastic else ""
    if use_gpu and gpus < need:
        raise ClusterError(f"{what} GPU workers requested but the cluster has {gpus:g} GPUs; "
                           f"use --workers {int(gpus) or 1}{'' if gpus else ' --cpu'}{fix_elastic} or add GPU nodes")
    if not use_gpu and cpus < need * CPUS_PER_WORKER:
        raise ClusterError(f"{what} CPU workers requested but the cluster has {cpus:g} CPUs; "
                           f"use --workers {max(int(cpus) // CPUS_PER_WORKER, 1)}{fix_elastic} or add nodes")
    capacity = gpus if use_gpu else cpus // CPUS_PER_WORKER
    if cfg.elastic and capacity < cfg.max_workers:
        logger.info("elastic run: %d of at most %d workers fit the cluster now; it grows as nodes join",
                    int(capacity), cfg.max_workers)


def worker_count(cfg: TrainConfig) -> WorkerCount:
    """``ScalingConfig(num_workers=...)``: ``workers``, or ``(min, max)`` for ``workers: [min, max]``."""
    return (cfg.min_workers, cfg.max_workers) if cfg.elastic else cfg.min_workers


def elastic_resize_interval_s(configured: float | None = None) -> float:
    """``elastic_resize_monitor_interval_s``, else the environment override, else 10 s."""
    if configured is not None:
        return configured
    text = os.environ.get(ELASTIC_RESIZE_ENV)
    if not text:
        return ELASTIC_RESIZE_MONITOR_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        raise ClusterError(f"{ELASTIC_RESIZE_ENV}={text!r} is not a number of seconds; unset it or give e.g. "
                           "30") from None
    if value < 0:
        raise ClusterError(f"{ELASTIC_RESIZE_ENV}={text!r} is negative; give seconds >= 0")
    return value


def preflight(cfg: TrainConfig) -> None:
    """Fail fast in the driver, before Ray starts workers, on names and paths it can check here.

    Shared by ``train`` and ``tune`` (per value a sweep can give).  ``--local`` needs none of this: the trainer
    builds model and data before it writes anything.
    """
    from ..data import DatasetError, build_datasets
    from ..data.builder import SYNTHETIC
    from ..models import build_model
    from ..models.limits import check_model_size

    check_model_size(cfg.model, cfg.num_classes or 10, "the config")  # on the meta device: nothing allocated
    build_model(cfg.model, cfg.num_classes or 10)
    if cfg.dataset == PARQUET:  # validation never silently defaults to the training shards
        from ..data.parquet import resolve_parquet_splits

        resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val)
        return
    if cfg.dataset == SYNTHETIC:  # built in memory
        return
    if cfg.data_dir is None or not Path(cfg.data_dir).exists():
        raise DatasetError(f"data_dir {cfg.data_dir!r} does not exist; put the {cfg.dataset} files there "
                           "or pass --set data_dir=... (nothing is downloaded)")
    if cfg.dataset.startswith("cifar"):  # cheap enough to open fully: catches a malformed directory
        build_datasets(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, aug=aug_options(cfg))


def run_config_for(cfg: TrainConfig, name: str, storage: RunStorage, fs, fs_path: str, callbacks=None):
    """Ray ``RunConfig``: storage, restarts and best-N-by-val_top1 checkpoint retention (plus the latest)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    return RunConfig(
        logging_config=LoggingConfig(log_level=ray_train_log_level()),  # the CLI sets WARNING unless --verbose
        name=name,
        storage_path=fs_path,
        storage_filesystem=None if storage.local else fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures,
                                     max_preemption_failures=MAX_PREEMPTION_FAILURES),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                           checkpoint_score_attribute=CHECKPOINT_SCORE,
                                           checkpoint_score_order="max"),
        callbacks=callbacks,
    )


@dataclass(frozen=True)
class Launch:
    """Where and how one ``TorchTrainer`` run goes: everything ``train`` and a tune trial differ in."""

    storage_uri: str  # Ray Train storage_path; the run dir is <storage_uri>/<name>
    name: str
    use_gpu: bool
    num_workers: WorkerCount
    cpus_per_worker: float = CPUS_PER_WORKER
    start_checkpoint: str | None = None  # a dyrep checkpoint a new run starts from (PBT exploit)

    @property
    def storage(self) -> RunStorage:
        return RunStorage(self.storage_uri, self.name)


def resources_per_worker(use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
    return {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def build_torch_trainer(cfg: TrainConfig, launch: Launch, *, callbacks: Sequence[TrainerCallback] = (),
                        ray_callbacks: Sequence[Any] | None = None,
                        loop: Callable[[dict], None] = train_loop_per_worker):
    """The one ``TorchTrainer`` factory of ``train`` and ``tune``: scaling, storage, retention, Ray Data.

    ``callbacks`` run in every worker's :class:`Trainer` (cloudpickled in the train loop config), after the
    preemption check every run gets; ``ray_callbacks`` are Ray Train controller callbacks (the Tune bridge).
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from .preemption import PreemptionCheckpoint
    from .recovery import FreshCapacityOnRestart

    storage = launch.storage
    storage_uri = storage.root.rsplit("/", 1)[0] if storage.local else launch.storage_uri  # absolute for workers
    fs, fs_path = resolve_filesystem(storage_uri)
    datasets = None
    # Parquet is streamed to workers through Ray Data (no copy of the data on every node), except with a global
    # batch: its steps need map-style access by sample index (each worker reads the shards with pyarrow).
    if cfg.dataset == PARQUET and cfg.global_batch_size is None:
        from .ray_data import parquet_datasets

        datasets = parquet_datasets(cfg)
    return TorchTrainer(
        loop,
        datasets=datasets,
        train_loop_config={"config": cfg.to_dict(), "storage_uri": storage_uri, "name": launch.name,
                           "start_checkpoint": launch.start_checkpoint, "ray_data": datasets is not None,
                           "callbacks": [PreemptionCheckpoint(cfg.preemption_check_steps), *callbacks]},
        scaling_config=ScalingConfig(num_workers=launch.num_workers, use_gpu=launch.use_gpu,
                                     resources_per_worker=resources_per_worker(launch.use_gpu,
                                                                               launch.cpus_per_worker),
                                     **({"elastic_resize_monitor_interval_s": elastic_resize_interval_s(
                                         cfg.elastic_resize_monitor_interval_s)}
                                        if isinstance(launch.num_workers, tuple) else {})),
        run_config=run_config_for(cfg, launch.name, storage, fs, fs_path,
                                  callbacks=[FreshCapacityOnRestart(), *(ray_callbacks or ())]),
    )


def run_distributed(cfg: TrainConfig, output_dir: str | Path, name: str, address: str | None = None,
                    callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train with Ray Train ``TorchTrainer``; returns the summary dict.  ``callbacks`` run on every worker."""
    connect(address)
    use_gpu = resolve_use_gpu(cfg)
    check_resources(cfg, use_gpu)
    launch = Launch(storage_uri=cfg.storage_path or str(output_dir), name=name, use_gpu=use_gpu,
                    num_workers=worker_count(cfg))
    storage = launch.storage
    # Refuse up front (exit 2) a run dir whose checkpoints are all unusable: never restart from scratch silently.
    newest = load_newest_valid(storage)
    if newest is not None:  # a resume: refuse a structural config change before any worker starts
        check_resume_config(newest.meta, cfg)
    driver_env = DriverTrackingEnvironment(cfg.mlflow_tracking_uri)
    trainer = build_torch_trainer(cfg, launch, callbacks=[driver_env, *callbacks])
    logger.info("launching %s %s worker(s)%s; run directory %s",
                f"{cfg.min_workers}-{cfg.max_workers}" if cfg.elastic else cfg.min_workers,
                "GPU" if use_gpu else "CPU", " (elastic)" if cfg.elastic else "", storage.root)
    from .recovery import ray_train_env

    try:
        with ray_train_env(cfg):  # the run's Ray Train settings reach the controller and workers through fit
            result = trainer.fit()
    except SystemExit:  # Ray Train's own SIGINT handler aborts the run, then calls sys.exit inside fit()
        raise KeyboardInterrupt from None  # -> the CLI's "interrupted; re-run the same command" line, exit 130
    if result.error is not None:
        raise result.error
    return summarize(read_metrics(storage), plain_params_from(storage))

