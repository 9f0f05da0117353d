"""Shared fixtures: one Ray instance for every integration test."""

from __future__ import annotations

import os

import pytest
import torch

# Sweep-signing secret of the tests: never the real ~/.config/dyrep-ray/secret of whoever runs them
# (a session-wide temp file; subprocesses and Ray workers inherit it).
if "DYREP_RAY_SECRET_FILE" not in os.environ:
    import tempfile

    os.environ["DYREP_RAY_SECRET_FILE"] = os.path.join(tempfile.mkdtemp(prefix="dyrep-test-secret-"), "secret")

# Small test workloads run faster single-threaded, and Ray workers share the 2 cores with the driver.
torch.set_num_threads(1)

# Tune-over-Train on 2 cores deadlocks unless Ray sees more logical CPUs than it has.
RAY_TEST_CPUS = 4
TINY_RUN = [
    "synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
    "dyrep_adjust_interval=1", "epochs=3", "workers=2", "log_interval=1000",
]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    # left running for the remaining tests; Ray shuts down at interpreter exit


@pytest.fixture()
def tiny_overrides():
    return list(TINY_RUN)
