"""Expensive Ray scenarios that several tests assert on, each run once per session (fixtures in conftest.py).

Each returns a namespace the tests only read: a test that needs to change what a scenario left (tamper with a
file, resume it again) works on a copy in its own ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import TINY_RUN
from tests.helpers import run_metrics

REPO = Path(__file__).resolve().parents[1]

#: The sweep of :func:`run_errored_sweep`: the shipped demo sweep (2 trials of small_cnn, 1 CPU worker each, ASHA)
#: at 2 epochs of 256 images, without Train retries, with a status table every second.
ERRORED_SWEEP_NAME = "demo"
ERRORED_SWEEP_ARGS = ["-c", str(REPO / "experiments" / "tune" / "demo.yaml"), "--set", "epochs=2",
                      "--set", "synthetic_train_size=256", "--set", "config.max_failures=0", "--status-interval", "1"]
SWEEP_COMMAND_TIMEOUT_S = 600


def user_env() -> dict[str, str]:
    """This process's environment as a user's shell has it (no console level left by an in-process CLI test),
    with this checkout importable (``tests.*``)."""
    from dyrep_ray.distributed.console import RAY_TRAIN_LOG_LEVEL_ENV

    env = {k: v for k, v in os.environ.items() if k != RAY_TRAIN_LOG_LEVEL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def console_messages(done: subprocess.CompletedProcess) -> list[str]:
    """The console lines of a ``dyrep-ray`` command (its stdout lines with the ``dyrep-ray: `` prefix), unprefixed."""
    prefix = "dyrep-ray: "
    return [line[len(prefix):] for line in done.stdout.splitlines() if line.startswith(prefix)]


def run_errored_sweep(root: Path, address: str) -> SimpleNamespace:
    """``dyrep-ray tune`` on :data:`ERRORED_SWEEP_ARGS` (a real process that starts a Ray instance of its own, as
    the command does by default) in which one trial's rank 0 raises mid-epoch 1 (once: the fault leaves
    ``root/fired``), then ``dyrep-ray tune --resume`` of it on the shared Ray instance at ``address``.

    Returns ``root``, ``sweep`` (``root/demo``), ``first`` / ``resumed`` (each command's ``CompletedProcess``: exit
    code and console) and ``after_first``: a copy of the files the ``--resume`` rewrites (tables, best config,
    signature, lock, ``tune.log``) as the first start left them."""
    from dyrep_ray.rundir.layout import LOCK_FILE, SWEEP_SIGNATURE, TUNE_LOG

    env, sweep = user_env(), root / ERRORED_SWEEP_NAME
    first = subprocess.run([sys.executable, "-m", "tests.tune_with_faults", "--raise-epoch", "0",
                            "--marker", str(root / "fired"), "--", "tune", *ERRORED_SWEEP_ARGS, "--output", str(root)],
                           cwd=root, env=env, capture_output=True, text=True, timeout=SWEEP_COMMAND_TIMEOUT_S)
    after_first = root / "after_first"
    after_first.mkdir()
    for name in ("trials.csv", "best_config.yaml", SWEEP_SIGNATURE, LOCK_FILE, TUNE_LOG):
        if (sweep / name).exists():
            shutil.copy2(sweep / name, after_first / name)
    resumed = subprocess.run([sys.executable, "-m", "dyrep_ray.cli", "tune", "--resume", "--output", str(root),
                              "--name", ERRORED_SWEEP_NAME, "--address", address, "--status-interval", "1"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=SWEEP_COMMAND_TIMEOUT_S)
    return SimpleNamespace(root=root, sweep=sweep, first=first, resumed=resumed, after_first=after_first)


#: :data:`TINY_RUN` (4 steps per epoch) with a mid-epoch checkpoint after every 2nd step and room for two restarts.
WORKER_KILLS_RUN = [*TINY_RUN, "checkpoint_every_steps=2", "max_failures=2"]


def run_worker_kills(root: Path) -> SimpleNamespace:
    """A 2-worker run of :data:`WORKER_KILLS_RUN` on the shared Ray instance (``root/killed``) whose rank 1 is
    SIGKILLed twice; Ray restarts the workers each time.

    1. After step 3 of epoch 2, past its mid-epoch checkpoint (global step 6): the restart resumes there.
    2. After step 1 of epoch 3, before its mid-epoch checkpoint and right after epoch 2's checkpoint was
       written (which Ray's controller may not have registered yet): the restart resumes from epoch 2's end
       (global step 8).

    Mid-epoch checkpoints change nothing in the training, so the run must end as :data:`TINY_RUN` uninterrupted.
    Returns ``run_dir`` and the two faults' markers, ``mid_epoch_kill`` and ``epoch_start_kill`` (each written
    when its fault fired)."""
    from dyrep_ray.distributed.trainer import run_distributed
    from dyrep_ray.engine.config import load_config
    from dyrep_ray.engine.faults import KillAt

    mid_epoch, epoch_start = root / "mid-epoch-kill-fired", root / "epoch-start-kill-fired"
    run_distributed(load_config(None, WORKER_KILLS_RUN), root, "killed",
                    callbacks=[KillAt(epoch=1, rank=1, marker=str(mid_epoch)),
                               KillAt(epoch=2, rank=1, step=0, marker=str(epoch_start))])
    return SimpleNamespace(run_dir=root / "killed", mid_epoch_kill=mid_epoch, epoch_start_kill=epoch_start)


def run_driver_killed(root: Path, address: str) -> SimpleNamespace:
    """SIGKILL a 2-worker ``dyrep-ray train`` driver of :data:`TINY_RUN` on the Ray instance at ``address``
    mid-epoch 3, truncate the newest checkpoint, re-run the same command with ``--verbose``.

    Returns ``run_dir`` (``root/drv``) and ``rerun`` (the re-run's ``CompletedProcess``: its console)."""
    run_args = ["--address", address, "--output", str(root), "--name", "drv",
                *sum((["--set", kv] for kv in TINY_RUN), [])]
    env = user_env()
    log_path = root / "driver1.log"
    # The same run through the Python API with a callback that stalls every rank mid-epoch 3 (0-based 2).
    stalled = [sys.executable, "-m", "tests.train_with_faults", "--sleep-epoch", "2", "--sleep-seconds", "120",
               *run_args]
    run_dir = root / "drv"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(stalled, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600  # a 2-worker run to its epoch-2 checkpoint, as long as the re-run may take
        while not (run_dir / "checkpoint_epoch0002" / "MANIFEST.json").exists():
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no epoch-2 checkpoint in time"
            time.sleep(0.5)
        time.sleep(2)  # inside epoch 3's injected stall
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert len(run_metrics(run_dir)) == 2
    state = run_dir / "checkpoint_epoch0002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # the latest checkpoint is now corrupt
    rerun = subprocess.run([sys.executable, "-m", "dyrep_ray.cli", "train", *run_args, "--verbose"], env=env,
                           capture_output=True, text=True, timeout=600)
    return SimpleNamespace(run_dir=run_dir, rerun=rerun)
