"""The console of ``dyrep-ray train``: the default command on real Ray (2 workers), and ``--local``.

Default: header, one line per epoch, the summary; none of Ray's per-report/per-checkpoint lines, none of the
known harmless warnings.  ``--verbose``: Ray's lines are back.  Everything lands in ``<run_dir>/train.log``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dyrep_ray.console import HARMLESS_PATTERNS, is_harmless
from dyrep_ray.engine.layout import TRAIN_LOG
from dyrep_ray.engine.progress import epoch_line

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
DEFAULT_COMMAND = ["train", "--set", f"epochs={EPOCHS}", "--set", "synthetic_train_size=256",
                   "--set", "synthetic_val_size=128"]
RAY_ROUTINE = ("Reporting training result", "Checkpoint successfully created")
#: Header + one line per epoch + summary, plus room for a real warning or two on a loaded machine.
MAX_DEFAULT_LINES = EPOCHS + 2 + 3
RUN_TIMEOUT_S = 480
EPOCH_LINE = re.compile(r"^dyrep-ray: epoch (\d+)/(\d+)  loss ")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env_path = str(REPO)
    return subprocess.run([sys.executable, "-m", "dyrep_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env={**_env(), "PYTHONPATH": env_path})


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "DYREP_RAY_TRAIN_LOG_LEVEL"}


def non_empty(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def check_default_console(done: subprocess.CompletedProcess, epochs: int) -> Path:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = non_empty(done.stdout) + non_empty(done.stderr)
    assert not [line for line in lines if any(r in line for r in RAY_ROUTINE)], lines
    assert not [line for line in lines if is_harmless(line)], lines
    epoch_numbers = [int(m.group(1)) for line in lines if (m := EPOCH_LINE.match(line))]
    assert epoch_numbers == list(range(1, epochs + 1)), lines  # exactly one line per epoch, in order
    header = [line for line in lines if line.startswith("dyrep-ray: train ") and "run dir" in line]
    assert len(header) == 1 and "model small_cnn" in header[0] and "synthetic" in header[0], lines
    summary = [line for line in lines if "best top-1" in line]
    assert len(summary) == 1, lines
    assert len(lines) <= MAX_DEFAULT_LINES, lines
    run_dir = Path(summary[0].rsplit("(run dir: ", 1)[1].rstrip(")"))
    log = (run_dir / TRAIN_LOG).read_text()
    assert "best top-1" in log and "epoch 1/" in log  # what the console shows is in the run's log too
    return run_dir


@pytest.mark.ray
def test_default_command_console_on_ray(tmp_path):
    done = run_cli(DEFAULT_COMMAND, tmp_path)
    run_dir = check_default_console(done, EPOCHS)
    assert "launching 2 CPU worker(s)" in (run_dir / TRAIN_LOG).read_text()  # hidden INFO, kept in the log


@pytest.mark.ray
def test_verbose_shows_rays_lines(tmp_path):
    done = run_cli([*DEFAULT_COMMAND, "--set", "epochs=1", "--verbose"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert all(r in out for r in RAY_ROUTINE), out[-3000:]


def test_local_console_and_quiet(tmp_path):
    local = [*DEFAULT_COMMAND, "--local", "--set", "batch_size=64", "--set", "dyrep_recal_bn_iters=2"]
    check_default_console(run_cli(local, tmp_path), EPOCHS)
    quiet = run_cli([*local, "--quiet", "--name", "quiet"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    lines = non_empty(quiet.stdout) + non_empty(quiet.stderr)
    assert not any(EPOCH_LINE.match(line) for line in lines) and any("best top-1" in line for line in lines), lines


def test_epoch_line_and_harmless_patterns():
    row = {"epoch": 3, "train_loss": 1.23456, "val_top1": 45.678, "lr": 0.01, "params": 12345, "n_blocks": 2,
           "images_per_s": 512.4, "epoch_time_s": 2.25, "events": [{"op": "grow", "path": "features.0"}]}
    assert epoch_line(row, 6) == ("epoch 3/6  loss 1.2346  top-1 45.68%  lr 0.01000  params 12,345  blocks 2  "
                                  "512 img/s  2.2s  [grow features.0]")
    preemption = ("[2026-12-01 22:25:58,656 E 29496 29526] core_worker.cc:2465: Actor with class name: "
                  "'PreemptionWatcher' and ID: 'bb' has constructor arguments in the object store and "
                  "max_restarts > 0. If the arguments ...")
    assert is_harmless(preemption) and len(HARMLESS_PATTERNS) >= 2
    assert not is_harmless("DyRep: cut skipped: non-finite metric")
    logging.getLogger(__name__).debug("patterns checked")
