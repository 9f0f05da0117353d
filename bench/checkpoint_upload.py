"""Benchmark 8: seconds the training loop is blocked in ``ray.train.report`` per checkpoint, synchronous vs
asynchronous upload (``checkpoint_upload_mode``), against a real S3-compatible server (moto in server mode,
``tests/s3server.py``, the one the suite uses).

One ``TorchTrainer`` run with one worker reports ``2 * pairs`` checkpoints of ``checkpoint_mb`` MiB each,
alternating SYNC and ASYNC (so load changes hit both alike).  Each report is timed from the call to its
return; after an ASYNC report the worker keeps "training" (sleeps ``step_gap_s``) and then waits, outside
the timed window, until Ray has committed the upload, so no upload of one mode overlaps a measurement of
the other.  The ratio is median(async blocked) / median(sync blocked).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid

import torch

from dyrep_ray.distributed.state_api import ray_init_without_dashboard

BUCKET = "dyrep-bench"
ASYNC_GOAL = 0.25  # async must block at most a quarter of what sync does
CHECKPOINT_FILE = "payload.bin"
CHUNK_BYTES = 1 << 20


def _write_payload(directory: str, size_mb: int) -> None:
    with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as f:
        f.writelines(os.urandom(CHUNK_BYTES) for _ in range(size_mb))  # incompressible, like trained weights


def _report_loop(config: dict) -> dict:
    """Ray Train worker: report checkpoints alternately SYNC / ASYNC, timing each ``report`` call."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode, CheckpointUploadMode

    blocked = {"sync": [], "async": []}
    commit_wait = []
    for i in range(2 * config["pairs"]):
        mode = "sync" if i % 2 == 0 else "async"
        tmp = tempfile.mkdtemp(prefix="dyrep-bench-ckpt-")
        _write_payload(tmp, config["checkpoint_mb"])
        t0 = time.perf_counter()
        ray.train.report({"i": i}, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"ckpt_{i:03d}",
                         checkpoint_upload_mode=CheckpointUploadMode.SYNC if mode == "sync"
                         else CheckpointUploadMode.ASYNC)
        blocked[mode].append(time.perf_counter() - t0)
        time.sleep(config["step_gap_s"])  # the training steps an async upload overlaps
        t1 = time.perf_counter()
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        if mode == "async":
            commit_wait.append(time.perf_counter() - t1)
        if len(reported) != i + 1:
            raise RuntimeError(f"{len(reported)} checkpoints committed after {i + 1} reports")
        if mode == "sync":  # ASYNC deletes its local copy after the upload; SYNC leaves it to us
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {"blocked_s": blocked, "async_commit_wait_s": commit_wait}


def test_server_filesystem(endpoint: str, env: dict[str, str]):
    """The test server's filesystem with its credentials in the object itself: pickled to Ray's workers with the
    run config, it needs nothing from their environment -- which was fixed when their Ray instance started,
    perhaps by another benchmark, before any variable this process sets now."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             region=env["AWS_DEFAULT_REGION"], endpoint_override=endpoint, scheme="http")


def run(device: torch.device | None = None, quick: bool = False, checkpoint_mb: int | None = None,
        pairs: int | None = None, step_gap_s: float | None = None, shutdown: bool = True) -> dict:
    """``device`` is unused (uploads are host work); ``shutdown=False`` leaves a Ray instance started here."""
    import ray
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tests.s3server import S3_TEST_ENV, moto_version_problem, s3_server

    problem = moto_version_problem()
    if problem:
        raise RuntimeError(problem)
    checkpoint_mb = checkpoint_mb or (8 if quick else 64)
    pairs = pairs or (2 if quick else 4)
    step_gap_s = step_gap_s if step_gap_s is not None else (1.0 if quick else 3.0)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(2, os.cpu_count() or 1), log_to_driver=False, **ray_init_without_dashboard())
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import bench/
    try:
        with s3_server(BUCKET) as endpoint:
            fs, fs_path = test_server_filesystem(endpoint, S3_TEST_ENV), f"{BUCKET}/upload-bench"
            trainer = TorchTrainer(
                _report_loop,
                train_loop_config={"checkpoint_mb": checkpoint_mb, "pairs": pairs, "step_gap_s": step_gap_s},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                run_config=RunConfig(name=f"upload-{uuid.uuid4().hex[:8]}", storage_path=fs_path,
                                     storage_filesystem=fs),
            )
            t0 = time.perf_counter()
            result = trainer.fit()
            wall = time.perf_counter() - t0
            if result.error is not None:
                raise result.error
            timings = result.return_value
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if started_here and shutdown:
            ray.shutdown()
    sync_s = statistics.median(timings["blocked_s"]["sync"])
    async_s = statistics.median(timings["blocked_s"]["async"])
    ratio = async_s / sync_s
    return {"checkpoint_mb": checkpoint_mb, "pairs": pairs, "step_gap_s": step_gap_s, "wall_s": wall,
            "blocked_s": timings["blocked_s"], "async_commit_wait_s": timings["async_commit_wait_s"],
            "sync_blocked_s": sync_s, "async_blocked_s": async_s, "async_over_sync": ratio,
            "sync_mb_per_s": checkpoint_mb / sync_s, "goal": ASYNC_GOAL, "met": ratio <= ASYNC_GOAL}


def skipped() -> dict:
    """Result when Ray runs are off (``--quick`` / ``--no-ray``)."""
    return {"skipped": "needs Ray runs (--ray)"}
