"""Driver side of distributed training: connect to Ray, launch a ``TorchTrainer``, summarize.

``train_loop_per_worker`` is the one function every Ray Train worker runs; it
builds a :class:`~dyrep_ray.distributed.context.RayTrainContext` and runs the same
loop as ``--local``.  Re-running with the same output dir and name resumes: Ray
Train restores its checkpoint manager from ``<output>/<name>`` and hands the
latest checkpoint to the workers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from ..engine.config import TrainConfig
from ..engine.context import CHECKPOINT_PREFIX, load_newest_valid
from ..engine.faults import FAULT_ENV
from ..engine.storage import RunStorage, resolve_filesystem
from ..engine.loop import METRICS_FILE, Trainer, summarize

logger = logging.getLogger(__name__)

CPUS_PER_WORKER = 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot run this job as requested (one-line, user-fixable)."""


def train_loop_per_worker(loop_config: dict) -> None:
    from .context import RayTrainContext

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if loop_config.get("fault"):  # test-only fault injection, forwarded from the driver's environment
        os.environ[FAULT_ENV] = loop_config["fault"]
    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = RayTrainContext(loop_config["storage_uri"], loop_config["name"],
                          start_checkpoint=loop_config.get("start_checkpoint"))
    if ctx.rank != 0:  # one progress log is enough
        logging.getLogger("dyrep_ray").setLevel(logging.WARNING)
    Trainer(cfg, ctx).fit()


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Attach to an existing cluster (``address``, ``RAY_ADDRESS`` or inside ``ray job submit``) or start one."""
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
        from .ray_local import stale_local_cluster

        stale = stale_local_cluster()  # a head that died without `ray stop`: ray.init would retry it for minutes
        if stale is not None:
            logger.warning("%s names a Ray head at %s that does not answer (it died without 'ray stop'); "
                           "starting a fresh local instance", *stale)
        ray.init(address="local" if stale else None, num_cpus=num_cpus, log_to_driver=True)
        return "local"
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local instance"
        raise ClusterError(f"cannot connect to Ray at {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
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
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if use_gpu and gpus < cfg.workers:
        raise ClusterError(f"{cfg.workers} GPU workers requested but the cluster has {gpus:g} GPUs; "
                           f"use --workers {int(gpus) or 1}{'' if gpus else ' --cpu'} or add GPU nodes")
    if not use_gpu and cpus < cfg.workers * CPUS_PER_WORKER:
        raise ClusterError(f"{cfg.workers} CPU workers requested but the cluster has {cpus:g} CPUs; "
                           f"use --workers {max(int(cpus) // CPUS_PER_WORKER, 1)} or add nodes")


def run_config_for(cfg: TrainConfig, name: str, storage: RunStorage, fs, fs_path: str, callbacks=None):
    """Ray ``RunConfig``: storage, restarts and best-N-by-val_top1 checkpoint retention (plus the latest)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=fs_path,
        storage_filesystem=None if storage.local else fs,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_top1",
                                           checkpoint_score_order="max"),
        callbacks=callbacks,
    )


def run_distributed(cfg: TrainConfig, output_dir: str | Path, name: str, address: str | None = None) -> dict:
    """Train with Ray Train ``TorchTrainer``; returns the summary dict."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(address)
    use_gpu = resolve_use_gpu(cfg)
    check_resources(cfg, use_gpu)
    storage_uri = cfg.storage_path or str(output_dir)
    storage = RunStorage(storage_uri, name)
    if storage.local:
        storage_uri = storage.root.rsplit("/", 1)[0]  # absolute: workers run in other directories
    fs, fs_path = resolve_filesystem(storage_uri)
    # Refuse up front (exit 2) a run dir whose checkpoints are all unusable: never restart from scratch silently.
    load_newest_valid(storage)
    run_dir = storage.root
    datasets = None
    if cfg.dataset == "parquet":  # streamed to workers through Ray Data: no copy of the data on every node
        from ..data.parquet import read_parquet_dataset

        datasets = {"train": read_parquet_dataset(cfg.parquet_train),
                    "val": read_parquet_dataset(cfg.parquet_val or cfg.parquet_train)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        train_loop_config={"config": cfg.to_dict(), "storage_uri": storage_uri, "name": name,
                           "fault": os.environ.get(FAULT_ENV)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": CPUS_PER_WORKER}),
        run_config=run_config_for(cfg, name, storage, fs, fs_path),
    )
    logger.info("launching %d %s worker(s); run directory %s", cfg.workers, "GPU" if use_gpu else "CPU", run_dir)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return summarize(read_metrics(storage), plain_params_from(storage))


def read_metrics(storage: RunStorage) -> list[dict]:
    text = storage.read_text(METRICS_FILE) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plain_params_from(storage: RunStorage) -> int:
    """Parameter count of the untouched model, from the newest checkpoint's meta."""
    for name in sorted(storage.list_dirs(CHECKPOINT_PREFIX), reverse=True):
        try:
            return int(json.loads(storage.read_text(f"{name}/meta.json") or "{}").get("plain_params", 0))
        except ValueError:
            continue
    return 0
