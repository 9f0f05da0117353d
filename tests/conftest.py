"""Shared fixtures: one Ray instance for every integration test."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch

from dyrep_ray.distributed.state_api import ray_init_without_dashboard
from dyrep_ray.engine.progress import CONSOLE_LOGGER
from tests.scheduling import check_groups, claim_ray_session, make_scheduler

# Sweep-signing secret of the tests: never the real ~/.config/dyrep-ray/secret of whoever runs them
# (a session-wide temp file; subprocesses and Ray workers inherit it).
# The process that makes it removes it at exit (xdist workers and subprocesses inherit the variable).
if "DYREP_RAY_SECRET_FILE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _secret_dir = tempfile.mkdtemp(prefix="dyrep-test-secret-")
    atexit.register(shutil.rmtree, _secret_dir, ignore_errors=True)
    os.environ["DYREP_RAY_SECRET_FILE"] = os.path.join(_secret_dir, "secret")

# Small test workloads run faster single-threaded, and Ray workers share the 2 cores with the driver.
torch.set_num_threads(1)

# Tune-over-Train on 2 cores deadlocks unless Ray sees more logical CPUs than it has.
RAY_TEST_CPUS = 4
#: The MLflow experiment of the ``ray_reference`` run.
REFERENCE_MLFLOW_EXPERIMENT = "set-in-the-driver"
TINY_RUN = [
    "synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
    "dyrep_adjust_interval=1", "epochs=3", "workers=2",
]


# --cpu-load N: N busy processes compete with the suite for the cores (a machine busy with other Ray work: other
# suites, other trials). They run at the niceness Ray gives its worker processes (15), so Ray's workers and they
# share the cores evenly, while the driver, GCS and raylets keep their priority as on any machine; at niceness 0
# they would leave each Ray worker ~2% of a core (a starved machine, not a busy one). --cpu-load-nice sets it.
# Each spins until its parent (this pytest) is gone, so none outlives an interrupted run.
_SPIN = ("import os, sys\nos.nice(int(sys.argv[1]))\nparent = os.getppid()\nwhile os.getppid() == parent:\n"
         "    sum(range(1_000_000))\n")
RAY_WORKER_NICENESS = 15


def pytest_addoption(parser):
    parser.addoption("--cpu-load", type=int, default=0, metavar="N",
                     help="run the suite against N busy processes (e.g. 4 = twice the cores of a 2-core machine)")
    parser.addoption("--cpu-load-nice", type=int, default=RAY_WORKER_NICENESS, metavar="K",
                     help=f"niceness of the --cpu-load processes (default {RAY_WORKER_NICENESS}: Ray's workers')")


#: Packages whose bytecode the suite compiles once, before its workers start: every Ray worker, CLI and driver it
#: starts imports them, and where Python writes no bytecode cache (PYTHONDONTWRITEBYTECODE, set on some CI images)
#: each of those hundreds of processes would compile them again (about 0.2 CPU-s each for the training path).
BYTECODE_PACKAGES = ("dyrep_ray", "tests", "bench")


def compile_bytecode() -> None:
    import compileall
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in BYTECODE_PACKAGES:
        compileall.compile_dir(root / package, quiet=1)


def pytest_configure(config):
    import subprocess
    import sys

    if hasattr(config, "workerinput"):  # an xdist worker: the controller keeps the load for the whole run
        return
    compile_bytecode()
    count, nice = config.getoption("--cpu-load"), config.getoption("--cpu-load-nice")
    config._cpu_load = [subprocess.Popen([sys.executable, "-c", _SPIN, str(nice)]) for _ in range(count)]


def pytest_unconfigure(config):
    for process in getattr(config, "_cpu_load", []):
        process.kill()
        process.wait()


def pytest_report_header(config):
    if getattr(config, "_cpu_load", None):
        return (f"cpu load: {len(config._cpu_load)} busy processes at niceness "
                f"{config.getoption('--cpu-load-nice')} (--cpu-load)")
    return None


# Two xdist workers; tests that share a Ray instance or a cluster run on one of them (tests/scheduling.py).
@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log)


def pytest_collection_modifyitems(config, items):
    check_groups(items)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    claim_ray_session(tmp_path_factory.getbasetemp())
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=RAY_TEST_CPUS, log_to_driver=False, **ray_init_without_dashboard())
    yield ray
    # left running for the remaining tests; Ray shuts down at interpreter exit


@pytest.fixture(scope="session")
def ray_reference(ray_session, tmp_path_factory):
    """One uninterrupted 2-worker Ray run of :data:`TINY_RUN` (read-only): what every fault-and-resume test on the
    shared Ray instance must end with. Returns ``(output dir, config, summary)``; the run is ``<output>/ref``.

    It also tracks to MLflow (an SQLite store, ``<output>/mlflow.db``) under the experiment
    :data:`REFERENCE_MLFLOW_EXPERIMENT`, named in the driver's environment after Ray started, as a user attaching
    to a running cluster would: tests/test_tracking.py reads what rank 0 logged. Tracking changes no weight."""
    from dyrep_ray.distributed.trainer import run_distributed
    from dyrep_ray.engine.config import load_config

    out = tmp_path_factory.mktemp("ray_reference")
    cfg = load_config(None, [*TINY_RUN, f"mlflow_tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_EXPERIMENT_NAME", REFERENCE_MLFLOW_EXPERIMENT)
        summary = run_distributed(cfg, out, "ref")
    return out, cfg, summary


@pytest.fixture(scope="session")
def ray_worker_kills(ray_session, tmp_path_factory):
    """A 2-worker Ray run whose rank 1 is SIGKILLed mid-epoch 2 and at the start of epoch 3 (read-only): see
    :func:`tests.shared_runs.run_worker_kills`; the mid-epoch and the epoch-checkpoint resume tests assert on it."""
    from tests.shared_runs import run_worker_kills

    return run_worker_kills(tmp_path_factory.mktemp("worker_kills"))


@pytest.fixture(scope="session")
def errored_sweep(ray_session, tmp_path_factory):
    """``dyrep-ray tune`` on the demo sweep with one trial raising, then its ``--resume`` on the shared instance
    (read-only): see :func:`tests.shared_runs.run_errored_sweep`; the Tune tests, the tune console test and the
    sweep-signing tests assert on it."""
    from tests.shared_runs import run_errored_sweep

    return run_errored_sweep(tmp_path_factory.mktemp("errored_sweep"), ray_session.get_runtime_context().gcs_address)


@pytest.fixture(scope="session")
def driver_killed_rerun(ray_session, tmp_path_factory):
    """A ``dyrep-ray train`` driver SIGKILLed mid-epoch 3, its newest checkpoint truncated, and the command re-run
    with ``--verbose`` (read-only): see :func:`tests.shared_runs.run_driver_killed`; the resume test and the
    console test assert on it."""
    from tests.shared_runs import run_driver_killed

    return run_driver_killed(tmp_path_factory.mktemp("driver_killed"), ray_session.get_runtime_context().gcs_address)


@pytest.fixture()
def tiny_overrides():
    return list(TINY_RUN)


class RecordList(logging.Handler):
    """Keeps every record it is given; attached by a test to the logger it asserts on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.NOTSET) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def clear(self) -> None:
        self.records.clear()


@contextlib.contextmanager
def capture_console():
    """The console logger's records (INFO and up) while the block runs, through a handler on that logger itself.

    Not pytest's ``caplog``: that reads the root logger through propagation, which depends on how each pytest
    version and whatever the code under test does to the root's handlers.
    """
    logger = logging.getLogger(CONSOLE_LOGGER)
    handler, level = RecordList(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture()
def console_records():
    """The console logger's records during the test (:func:`capture_console`)."""
    with capture_console() as handler:
        yield handler
