"""Smoke test of benchmark 8 (``bench/checkpoint_upload.py``) with tiny checkpoints: a real Ray Train run
reporting to the real S3-compatible test server, SYNC and ASYNC uploads timed in one run."""

from __future__ import annotations

import os

import pytest

from bench import checkpoint_upload
from bench.report import ROW_BUILDERS, markdown_table
from tests.s3server import S3_TEST_ENV, moto_version_problem

os.environ.update(S3_TEST_ENV)  # before the shared Ray instance starts: its workers inherit it

pytestmark = pytest.mark.ray


@pytest.mark.skipif(moto_version_problem() is not None, reason=str(moto_version_problem()))
def test_checkpoint_upload_benchmark_sync_vs_async(ray_session):
    r = checkpoint_upload.run(None, checkpoint_mb=2, pairs=2, step_gap_s=0.5)
    assert len(r["blocked_s"]["sync"]) == len(r["blocked_s"]["async"]) == 2
    assert len(r["async_commit_wait_s"]) == 2
    assert all(t > 0 for mode in ("sync", "async") for t in r["blocked_s"][mode])
    # the point of ASYNC: the upload leaves the training path (a sync upload of 2 MiB to the server
    # takes tens of ms at least; handing it to Ray's upload thread takes far less)
    assert r["async_blocked_s"] < r["sync_blocked_s"], r
    assert r["async_over_sync"] == pytest.approx(r["async_blocked_s"] / r["sync_blocked_s"])
    rows = ROW_BUILDERS["checkpoint_upload"](r)
    assert rows[0][0] == "8" and "async / sync" in markdown_table(rows)
    skipped = ROW_BUILDERS["checkpoint_upload"](checkpoint_upload.skipped())
    assert skipped[0][4] is None
