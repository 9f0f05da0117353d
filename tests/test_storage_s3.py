"""Checkpoints on an object store: a real S3 API (moto server on 127.0.0.1), resume from the bucket alone.

The run directory is ``s3://dyrep-test/<prefix>/<name>?endpoint_override=127.0.0.1:PORT&scheme=http``;
credentials come from the environment (fake ones, see ``tests/s3server.py``).  They are put into
``os.environ`` when this module is imported, i.e. at collection time, before the shared Ray instance
of ``conftest.ray_session`` is started: raylet and every Ray worker inherit them, as nodes of a real
cluster get theirs from instance roles / workload identity.  Nothing secret travels in a runtime_env.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dyrep_ray.engine.config import TrainConfig, load_config
from dyrep_ray.engine.context import LocalContext, load_newest_valid
from dyrep_ray.engine.faults import RaiseAt
from dyrep_ray.engine.loop import train
from dyrep_ray.rundir.layout import CHECKPOINT_PREFIX, CONFIG_FILE, METRICS_FILE, STRUCTURE_FILE
from dyrep_ray.rundir.storage import RunStorage
from tests.helpers import RESUME_ATOL, max_abs_diff
from tests.s3server import S3_TEST_ENV, list_keys, moto_version_problem, s3_server

os.environ.update(S3_TEST_ENV)

BUCKET = "dyrep-test"
LOCAL_TINY = ["synthetic_train_size=128", "synthetic_val_size=64", "batch_size=32", "dyrep_recal_bn_iters=2",
              "epochs=3", "dyrep_grow_topk=2"]


@pytest.fixture(scope="module")
def s3():
    problem = moto_version_problem()
    if problem:
        pytest.skip(problem)
    with s3_server(BUCKET) as endpoint:
        yield endpoint


@contextmanager
def one_thread():
    """One intra-op thread, as in a Ray worker (OMP_NUM_THREADS=1 there): bit-identical results between
    the local and the Ray runs, and on a busy 2-core machine no OpenMP threads spin-waiting for each other
    (which makes the tiny local runs ~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory):
    """The uninterrupted run on local disk: final checkpoint and metrics."""
    cfg = load_config(None, LOCAL_TINY)
    storage = RunStorage(str(tmp_path_factory.mktemp("disk")), "ref")
    with one_thread():
        train(cfg, LocalContext(torch.device("cpu"), storage, cfg.keep_checkpoints))
    return _newest_checkpoint(storage), _metrics(storage)


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"


def _metrics(storage: RunStorage) -> list[dict]:
    return [json.loads(x) for x in (storage.read_text(METRICS_FILE) or "").splitlines()]


def _newest_checkpoint(storage: RunStorage):
    ckpt = load_newest_valid(storage)
    assert ckpt is not None, f"no valid checkpoint under {storage.root}"
    return ckpt




def _assert_empty(directory: Path, what: str) -> None:
    left = sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
    assert not left, f"{what} left local files: {left}"


def test_run_storage_roundtrip_on_s3(s3, tmp_path):
    # both spellings of a custom endpoint work
    for uri in (s3_uri(s3, "unit"), f"s3://{BUCKET}/unit?endpoint_override=http://{s3}"):
        storage = RunStorage(uri, "r")
        assert not storage.local and storage.root == f"{BUCKET}/unit/r"
        storage.write_text("a/b.txt", "hello")
        assert storage.read_text("a/b.txt") == "hello"
        assert storage.read_text("missing.txt") is None
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True, exist_ok=True)
        (src / "MANIFEST.json").write_text("{}")
        (src / "state.pt").write_bytes(b"x" * 10)
        (src / "sub" / "c.txt").write_text("c")
        storage.upload_dir(src, "checkpoint_epoch0001")
        (src / "state.pt").unlink()  # a replaced directory keeps nothing of the old one
        storage.upload_dir(src, "checkpoint_epoch0001")
        assert storage.list_dirs(CHECKPOINT_PREFIX) == ["checkpoint_epoch0001"]
        keys = list_keys(s3, BUCKET, "unit/r/checkpoint_epoch0001/")
        assert [k for k in keys if not k.endswith("/")] == [
            "unit/r/checkpoint_epoch0001/MANIFEST.json", "unit/r/checkpoint_epoch0001/sub/c.txt"]
        down = storage.temp_download("checkpoint_epoch0001")
        try:
            assert sorted(p.relative_to(down).as_posix() for p in down.rglob("*") if p.is_file()) == [
                "MANIFEST.json", "sub/c.txt"]
        finally:
            import shutil

            shutil.rmtree(down.parent)
        storage.delete_dir("")
        assert list_keys(s3, BUCKET, "unit/r/") == []


def test_local_run_interrupted_then_resumed_from_bucket_only(s3, disk_reference, tmp_path, monkeypatch, caplog):
    """Train to the middle of epoch 3 with every file in the bucket, keep nothing local, resume from the
    bucket (config included) on a "fresh machine", and end with the weights of an uninterrupted run."""
    reference, reference_metrics = disk_reference
    cfg = load_config(None, LOCAL_TINY)
    # every temp file and the working directory of the S3 run are watched: nothing may stay behind
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    uri = s3_uri(s3, "local")
    with one_thread(), pytest.raises(RuntimeError, match="injected fault"):
        train(cfg, LocalContext(torch.device("cpu"), RunStorage(uri, "run"), cfg.keep_checkpoints),
              callbacks=[RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])

    keys = list_keys(s3, BUCKET, "local/run/")
    for name in ("checkpoint_epoch0001", "checkpoint_epoch0002"):
        for f in ("MANIFEST.json", "meta.json", "state.pt", "structure.json"):
            assert f"local/run/{name}/{f}" in keys, keys
    for f in (METRICS_FILE, STRUCTURE_FILE, CONFIG_FILE):
        assert f"local/run/{f}" in keys, keys
    interrupted = _metrics(RunStorage(uri, "run"))
    assert [m["epoch"] for m in interrupted] == [1, 2]
    assert all(m["events"] for m in interrupted)  # DyRep grew after epochs 1 and 2
    _assert_empty(scratch, "the interrupted run (temp dirs)")
    _assert_empty(cwd, "the interrupted run (working directory)")

    # An upload cut off mid-way (no MANIFEST.json) must be skipped, then replaced by the real epoch 3.
    RunStorage(uri, "run").write_text("checkpoint_epoch0003/state.pt", "partial upload")

    # "another machine": nothing but the URI; even the config comes from the bucket
    storage = RunStorage(uri, "run")
    cfg2 = TrainConfig.from_dict(json.loads(storage.read_text(CONFIG_FILE)))
    assert cfg2 == cfg
    caplog.set_level("INFO")
    with one_thread():
        summary = train(cfg2, LocalContext(torch.device("cpu"), storage, cfg2.keep_checkpoints))
    assert "checkpoint unusable" in caplog.text and "resumed from" in caplog.text
    assert summary["epochs"] == 3
    final = _metrics(storage)
    assert [m["epoch"] for m in final] == [1, 2, 3]
    assert final[:2] == interrupted  # epochs 1-2 were not re-run (timings included)
    _assert_empty(scratch, "the resumed run (temp dirs)")
    _assert_empty(cwd, "the resumed run (working directory)")

    ckpt = _newest_checkpoint(storage)
    assert ckpt.meta["epoch"] == 3
    assert ckpt.graph == reference.graph == json.loads(storage.read_text(STRUCTURE_FILE))
    worst = max_abs_diff(reference.state["model"], ckpt.state["model"])
    assert worst <= RESUME_ATOL, worst
    assert final[-1]["val_top1"] == reference_metrics[-1]["val_top1"]


@pytest.mark.ray
def test_ray_train_interrupted_then_resumed_from_bucket(s3, disk_reference, ray_session, tmp_path, monkeypatch):
    """Ray Train with storage_path on S3: the run dies in epoch 3 (max_failures=0); re-running with the same
    name and storage_path resumes from the bucket and ends with the weights of the uninterrupted run.

    One worker, so that the uninterrupted local-disk run is an exact reference (a Ray worker runs the same
    loop with world size 1 and one thread); multi-worker sync and in-run restarts are covered by
    test_train_ray.py.  What this adds: Ray's storage_filesystem on S3, workers and the Train controller
    reaching the bucket with credentials from their environment, resume across separate runs.
    """
    from dyrep_ray.distributed.trainer import run_distributed

    @ray_session.remote(num_cpus=0)
    def worker_env():
        return {k: os.environ.get(k) for k in S3_TEST_ENV}

    if ray_session.get(worker_env.remote()) != S3_TEST_ENV:
        pytest.skip("the Ray instance was started before this module set the S3 test credentials")

    reference, reference_metrics = disk_reference
    uri = s3_uri(s3, "ray")
    cfg = load_config(None, LOCAL_TINY + [f"storage_path={uri}", "workers=1", "max_failures=0"])
    with pytest.raises(Exception, match="injected fault"):
        run_distributed(cfg, tmp_path / "unused", "run", callbacks=[RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])
    storage = RunStorage(uri, "run")
    interrupted = _metrics(storage)
    assert [m["epoch"] for m in interrupted] == [1, 2]
    assert storage.list_dirs(CHECKPOINT_PREFIX)[-1] == "checkpoint_epoch0002"

    summary = run_distributed(cfg, tmp_path / "unused", "run")
    assert summary["epochs"] == 3
    final = _metrics(storage)
    assert [m["epoch"] for m in final] == [1, 2, 3]
    assert final[:2] == interrupted  # resumed, not restarted
    ckpt = _newest_checkpoint(storage)
    assert ckpt.meta["epoch"] == 3 and ckpt.graph == reference.graph
    worst = max_abs_diff(reference.state["model"], ckpt.state["model"])
    assert worst <= RESUME_ATOL, worst
    assert final[-1]["val_top1"] == reference_metrics[-1]["val_top1"]
    assert not (tmp_path / "unused").exists()  # everything went to the bucket
