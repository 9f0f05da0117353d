"""The Ray benchmarks share one Ray instance in ``python -m bench``: benchmark 6 (``bench/ray_overhead.py``)
starts it and leaves it up, benchmark 8 (``bench/checkpoint_upload.py``) reuses it. Run in that order, in a fresh
process with no S3 credentials in its environment, on tiny sizes: a real Ray Train run reporting SYNC and ASYNC
checkpoints to the real S3-compatible test server, whose credentials must reach the workers through the run's
filesystem object (the workers' environment was fixed when benchmark 6 started Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import checkpoint_upload
from bench.report import ROW_BUILDERS, markdown_table
from tests.s3server import S3_TEST_ENV, moto_version_problem

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
TINY_OVERHEAD = ["model=small_cnn", "dataset=synthetic", "synthetic_train_size=64", "synthetic_val_size=32",
                 "batch_size=32", "epochs=1", "workers=1", "use_gpu=false", "dyrep=false"]
IN_ORDER = """
import json, sys, torch
from bench import checkpoint_upload, ray_overhead
overhead = ray_overhead.run(torch.device("cpu"), pairs=1, overrides=json.loads(sys.argv[1]), shutdown=False)
upload = checkpoint_upload.run(None, checkpoint_mb=2, pairs=2, step_gap_s=0.5)
print(json.dumps({"overhead": overhead, "upload": upload}))
"""


@pytest.mark.skipif(moto_version_problem() is not None, reason=str(moto_version_problem()))
def test_upload_benchmark_after_the_overhead_benchmark_on_its_ray_instance(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in S3_TEST_ENV and not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", IN_ORDER, json.dumps(TINY_OVERHEAD)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    overhead, r = results["overhead"], results["upload"]
    assert len(overhead["runs"]["ray"]) == 1 and overhead["epoch_s_ray"] > 0 and overhead["epoch_ratio"] > 0

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
