"""Benchmark 6: Ray Train overhead. The same config (synthetic data) under ``TorchTrainer`` with
1 worker vs in-process ``--local`` (``engine.loop.train`` + ``LocalContext``), runs alternated
(local, ray, local, ...). Per-epoch ``epoch_time_s`` / ``train_time_s`` come from each run's
metrics.jsonl; start-up = run wall time - sum of epoch times (``ray.init`` reported separately)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dyrep_ray.distributed.state_api import ray_init_without_dashboard
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.rundir.layout import METRICS_FILE

# DyRep off: every epoch then has the same structure and cost, so per-epoch medians compare like with
# like (DyRep's own costs are benchmarks 1 and 5; with 1 worker its adjust involves no Ray call).
DEFAULT_OVERRIDES = ("model=small_cnn", "dataset=synthetic", "synthetic_train_size=1024", "synthetic_val_size=256",
                     "batch_size=64", "epochs=4", "workers=1", "use_gpu=false", "dyrep=false",
                     "num_data_workers=0")


def _epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]


def _summary(run_dir: Path, wall: float) -> dict:
    epochs = _epochs(run_dir)
    epoch_times = [m["epoch_time_s"] for m in epochs]
    return {"wall_s": wall, "epoch_time_s": epoch_times, "train_time_s": [m["train_time_s"] for m in epochs],
            "median_epoch_s": statistics.median(epoch_times),
            "median_train_s": statistics.median(m["train_time_s"] for m in epochs),
            "startup_s": wall - sum(epoch_times)}


def run(device: torch.device, quick: bool = False, pairs: int | None = None, overrides=DEFAULT_OVERRIDES,
        shutdown: bool = True) -> dict:
    """``shutdown=False`` leaves a Ray instance this function started running (for the next benchmark)."""
    import ray

    from dyrep_ray.distributed.trainer import run_distributed

    pairs = pairs or 1
    cfg = load_config(None, list(overrides))
    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False, **ray_init_without_dashboard())
    ray_init_s = time.perf_counter() - t0
    runs = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="dyrep-bench-ray-") as tmp:
        order = ["local"] + ["ray", "local"] * pairs  # each ray run bracketed by local runs
        for i, kind in enumerate(order):
            name = f"{kind}{i}"
            t = time.perf_counter()
            if kind == "local":
                train(cfg, LocalContext(torch.device("cpu"), Path(tmp) / name, cfg.keep_checkpoints))
            else:
                run_distributed(cfg, tmp, name)
            runs[kind].append(_summary(Path(tmp) / name, time.perf_counter() - t))
    if started_here and shutdown:
        ray.shutdown()
    local_epoch = statistics.median(r["median_epoch_s"] for r in runs["local"])
    ray_epoch = statistics.median(r["median_epoch_s"] for r in runs["ray"])
    local_train = statistics.median(r["median_train_s"] for r in runs["local"])
    ray_train = statistics.median(r["median_train_s"] for r in runs["ray"])
    ratio = ray_epoch / local_epoch
    return {
        "config": list(overrides), "pairs": pairs, "ray_init_s": ray_init_s,
        "local_threads": torch.get_num_threads(),
        "runs": runs,
        "epoch_s_local": local_epoch, "epoch_s_ray": ray_epoch, "epoch_ratio": ratio,
        "train_s_local": local_train, "train_s_ray": ray_train, "train_ratio": ray_train / local_train,
        "startup_s_local": statistics.median(r["startup_s"] for r in runs["local"]),
        "startup_s_ray": statistics.median(r["startup_s"] for r in runs["ray"]),
        "goal": 1.05, "met": ratio <= 1.05,
    }
