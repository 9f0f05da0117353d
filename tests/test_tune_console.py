"""The tune command's console (:class:`dyrep_ray.tune.console.SweepConsole`) driven hook by hook, as Tune does.

Trials are plain records with the attributes Tune's ``Trial`` exposes to callbacks (``trial_id``, ``status``,
``config``, ``last_result``, ``error_file``); the real-sweep tests in ``test_tune.py`` and ``test_console.py`` run
the console under Tune itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dyrep_ray.engine.progress import EPOCH_LINE
from dyrep_ray.tune.commands import DEFAULT_STATUS_INTERVAL_S as CLI_DEFAULT_INTERVAL
from dyrep_ray.tune.console import DEFAULT_STATUS_INTERVAL_S, SweepConsole
from dyrep_ray.tune.spec import load_sweep

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "tune" / "demo.yaml"


@dataclass
class TrialRecord:
    trial_id: str
    config: dict
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)
    error_file: str | None = None


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result(epoch: int, top1: float, **extra) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 - epoch / 10, "val_top1": top1, "lr": 0.01, "params": 1234,
            "n_blocks": 1, "images_per_s": 500.0, "epoch_time_s": 1.5, "training_iteration": epoch, **extra}


@pytest.fixture()
def spec():
    return load_sweep(DEMO, ["epochs=3"])  # searches dyrep_cut_threshold and lr, metric val_top1 (max)


@pytest.fixture()
def lines(console_records):
    return console_records.messages


def heartbeat(console: SweepConsole, trials: list, *usage: str, done: bool = False) -> None:
    """What Tune does after every step with its progress reporter (scheduler line first, as Tune passes it)."""
    reporter = console.reporter()
    if reporter.should_report(trials, done=done):
        reporter.report(trials, done, "Using AsyncHyperBand: num_stopped=0", *usage)


def feed(console: SweepConsole, trial: TrialRecord, res: dict) -> None:
    trial.last_result = res
    console.on_trial_result(0, [trial], trial, res)


def test_one_line_per_result_with_structure_events(spec, lines):
    console = SweepConsole(spec, status_interval_s=0)
    trial = TrialRecord("t0", {"dyrep_cut_threshold": 0.2, "lr": 0.05}, "RUNNING")
    console.on_trial_start(0, [trial], trial)
    feed(console, trial, result(1, 20.0, structure_events="grow features.0.0, cut features.4.0"))
    feed(console, trial, result(2, 30.0, structure_events=""))
    shown = lines()
    assert shown[0] == "trial t0 started: dyrep_cut_threshold=0.2, lr=0.05"
    assert shown[1].startswith("trial t0 epoch 1/3  loss 1.9000  top-1 20.00%")
    assert shown[1].endswith("[grow features.0.0]  [cut features.4.0]")
    assert shown[2].startswith("trial t0 epoch 2/3 ") and "[" not in shown[2]
    assert len(shown) == 3


def test_result_lines_are_marked_as_epoch_lines_and_quiet_hides_them(spec, console_records, capsys):
    from dyrep_ray.console import setup_console

    console = SweepConsole(spec, 0)
    trial = TrialRecord("t0", {"dyrep_cut_threshold": 0.2, "lr": 0.05}, "RUNNING")
    feed(console, trial, result(1, 20.0))
    assert [getattr(r, EPOCH_LINE, False) for r in console_records.records] == [True]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    setup_console(quiet=True)  # what the CLI's --quiet sets up, for train and tune alike
    try:
        capsys.readouterr()
        feed(console, trial, result(2, 25.0))
        console.on_trial_complete(0, [trial], trial)
        shown = capsys.readouterr().out.splitlines()
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    assert shown == ["dyrep-ray: trial t0 stopped by asha after epoch 2 (2/3 epochs): best val_top1 25 at epoch 2"]


def test_completed_and_stopped_trials(spec, lines):
    console = SweepConsole(spec, 0)
    done, stopped = (TrialRecord(t, {"dyrep_cut_threshold": 0.1, "lr": 0.01}, "RUNNING") for t in ("a", "b"))
    for epoch, top1 in ((1, 10.0), (2, 40.0), (3, 35.0)):  # best is not the last epoch
        feed(console, done, result(epoch, top1))
    feed(console, stopped, result(1, 5.0))
    console.on_trial_complete(0, [done, stopped], done)
    console.on_trial_complete(0, [done, stopped], stopped)
    assert lines()[-2:] == ["trial a completed (3/3 epochs): best val_top1 40 at epoch 2",
                            "trial b stopped by asha after epoch 1 (1/3 epochs): best val_top1 5 at epoch 1"]


def test_mode_min_tracks_the_lowest(spec, lines):
    spec.metric, spec.mode = "val_loss", "min"
    console = SweepConsole(spec, 0)
    trial = TrialRecord("a", {}, "RUNNING")
    for epoch, loss in ((1, 2.0), (2, 1.0), (3, 1.5)):
        feed(console, trial, {**result(epoch, 0.0), "val_loss": loss})
    console.on_trial_complete(0, [trial], trial)
    assert lines()[-1] == "trial a completed (3/3 epochs): best val_loss 1 at epoch 2"


def test_failure_is_one_warning_naming_the_cause(spec, tmp_path, console_records, lines):
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  File ...\n"
                          "dyrep_ray.tune.trainable.TrialError: trial a failed: ValueError: injected fault\n")
    console = SweepConsole(spec, 0)
    trial = TrialRecord("a", {}, "ERROR", error_file=str(error_file))
    feed(console, trial, result(1, 10.0))
    console.on_trial_error(0, [trial], trial)
    warnings = [r for r in console_records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (f"trial a failed after epoch 1: trial a failed: ValueError: injected fault "
                                        f"({error_file})")
    console_records.clear()
    console.on_trial_recover(0, [trial], trial)
    assert lines()[-1] == "trial a will be retried from its latest checkpoint"


def test_status_table_at_the_interval_and_only_after_a_change(spec, lines):
    clock = Clock()
    console = SweepConsole(spec, status_interval_s=60, clock=clock)
    console.setup(start_time=0.0)
    a = TrialRecord("a", {"dyrep_cut_threshold": 0.25, "lr": 0.0123456}, "RUNNING")
    b = TrialRecord("b", {"dyrep_cut_threshold": 0.1, "lr": 0.05}, "PENDING")
    console.on_trial_start(0, [a, b], a)
    clock.now += 30
    heartbeat(console, [a, b], "Logical resource usage: 1.0/4 CPUs")
    assert len(lines()) == 1  # 30 s < 60 s: no table yet
    feed(console, a, result(1, 12.5))
    feed(console, a, result(2, 11.0))
    clock.now += 31
    heartbeat(console, [a, b], "Logical resource usage: 1.0/4 CPUs")
    table = lines()[-1].splitlines()
    assert table[0] == "status after 1m01s: 2 trial(s): 1 RUNNING | 1 PENDING; best a val_top1 12.5 at epoch 1"
    assert table[1] == "  Logical resource usage: 1.0/4 CPUs"
    assert table[2].split() == ["trial", "status", "dyrep_cut_threshold", "lr", "epoch", "val_top1", "best",
                                "val_top1"]
    assert table[3].split() == ["a", "RUNNING", "0.25", "0.01235", "2", "11", "12.5"]
    assert table[4].split() == ["b", "PENDING", "0.1", "0.05", "-", "-", "-"]
    n = len(lines())
    clock.now += 600
    heartbeat(console, [a, b])  # nothing happened since the last table: none
    assert len(lines()) == n
    console.on_trial_start(0, [a, b], b)
    heartbeat(console, [a, b], done=True)  # Tune's final report: the CLI prints its own table
    assert len(lines()) == n + 1
    heartbeat(console, [a, b])
    assert len(lines()) == n + 2 and lines()[-1].startswith("status after 11m01s: ")


def test_status_interval_zero_prints_no_tables(spec, lines):
    clock = Clock()
    console = SweepConsole(spec, status_interval_s=0, clock=clock)
    trial = TrialRecord("a", {}, "RUNNING")
    feed(console, trial, result(1, 1.0))
    clock.now += 10_000
    heartbeat(console, [trial])
    assert not [m for m in lines() if m.startswith("status after")]


def test_bad_interval_and_cli_default(spec):
    with pytest.raises(ValueError, match="status_interval_s"):
        SweepConsole(spec, status_interval_s=-1)
    assert CLI_DEFAULT_INTERVAL == DEFAULT_STATUS_INTERVAL_S  # the CLI keeps its own copy (no Ray at --help)


def test_pbt_exploit_is_named_once(spec, lines):
    console = SweepConsole(spec, 0)
    trial = TrialRecord("weak", {"dyrep_cut_threshold": 0.2, "lr": 0.03}, "RUNNING")
    feed(console, trial, result(1, 5.0))
    feed(console, trial, result(3, 30.0, pbt_donor="strong", pbt_donor_epoch=2))
    feed(console, trial, result(4, 31.0, pbt_donor="strong", pbt_donor_epoch=2))
    marked = [m for m in lines() if "[PBT:" in m]
    assert marked == [m for m in lines() if m.startswith("trial weak epoch 3/3")]
    assert marked[0].endswith("[PBT: continues strong epoch 2; dyrep_cut_threshold=0.2, lr=0.03]")
    feed(console, trial, result(5, 40.0, pbt_donor="strong", pbt_donor_epoch=4))  # exploited again, same donor
    assert lines()[-1].endswith("[PBT: continues strong epoch 4; dyrep_cut_threshold=0.2, lr=0.03]")


def test_console_survives_pickling_into_tuner_state(spec):
    import pickle

    console = SweepConsole(spec, 45.0)
    copy = pickle.loads(pickle.dumps(console))
    assert copy.status_interval_s == 45.0 and copy.spec.metric == spec.metric


def test_sweep_mlflow_file_store_is_made_absolute_before_trials_see_it(tmp_path, monkeypatch):
    from dyrep_ray.tune.commands import resolve_sweep_tracking_uri

    monkeypatch.chdir(tmp_path)
    spec = load_sweep(DEMO, ["mlflow_tracking_uri=mlruns"])
    resolve_sweep_tracking_uri(spec)
    assert spec.base_config["mlflow_tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    spec = load_sweep(DEMO, ["mlflow_tracking_uri=http://mlflow:5000"])
    resolve_sweep_tracking_uri(spec)
    assert spec.base_config["mlflow_tracking_uri"] == "http://mlflow:5000"  # a server URL stays as given
