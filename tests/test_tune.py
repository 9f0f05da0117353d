"""dyrep-ray tune: sweep files, the PBT checkpoint bridge, and real sweeps on the shared Ray instance.

Fast tests (no Ray) check the sweep format, its one-line errors and the segment logic of the bridge.
Ray tests run real sweeps (one TorchTrainer per trial, 1 CPU worker, tiny synthetic data): a PBT sweep
that forces an exploit and checks that the weak trial continues from the donor's structure,
weights, optimizer state and epoch with its mutated learning rate, and the demo sweep through ``dyrep-ray tune``
with one trial raising, then resumed (the session's ``errored_sweep``; tests/test_console.py checks its console
and its result files).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dyrep_ray.engine.checkpoint import load_checkpoint_dir, write_checkpoint_dir
from dyrep_ray.engine.config import ConfigError
from dyrep_ray.rundir.layout import CONFIG_FILE, STRUCTURE_FILE
from dyrep_ray.tune.bridge import (
    BRIDGE_FILE,
    ORIGIN_FILE,
    START_CHECKPOINT_DIR,
    checkpoint_fingerprint,
    plan_segment,
    start_checkpoint_of,
)
from dyrep_ray.tune.console import SweepConsole
from dyrep_ray.tune.spec import load_sweep
from tests.helpers import run_metrics

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "experiments" / "tune"
TINY = {"synthetic_train_size": 256, "synthetic_val_size": 128, "batch_size": 32, "dyrep_adjust_interval": 1,
        "dyrep_recal_bn_iters": 2, "max_failures": 0}




def _sweep(raw: dict, tmp_path: Path, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------------------------- sweep files


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    spec = load_sweep(path)
    assert spec.search_space and spec.metric == "val_top1" and spec.mode == "max"
    assert spec.scheduler_type in ("asha", "pbt")
    cfg = spec.trial_config({k: (d.values[0] if d.values else d.low) for k, d in spec.search_space.items()})
    assert cfg.workers == spec.workers


def test_shipped_sweeps_cover_the_issue():
    asha = load_sweep(SWEEPS / "cifar10_vgg16_asha.yaml")
    assert set(asha.search_space) == {"dyrep_cut_threshold", "dyrep_cut_std_gate", "dyrep_adjust_interval",
                                      "dyrep_grow_topk", "dyrep_metric"}
    assert asha.base_config["model"] == "vgg16_cifar" and asha.base_config["dataset"] == "cifar10"
    pbt = load_sweep(SWEEPS / "cifar10_vgg16_pbt.yaml")
    assert set(pbt.mutations) == {"lr", "dyrep_cut_threshold"} and pbt.scheduler_type == "pbt"
    demo = load_sweep(SWEEPS / "demo.yaml")
    assert demo.base_config["dataset"] == "synthetic" and demo.workers == 1 and demo.base_config["epochs"] <= 3
    assert demo.num_samples * 1 <= 3 and demo.base_config["synthetic_train_size"] <= 512


def test_overrides_reach_config_and_sweep(tmp_path):
    spec = load_sweep(SWEEPS / "demo.yaml", ["epochs=2", "num_samples=3", "scheduler.grace_period=1",
                                             "resources.workers=2", "config.lr=0.2"])
    assert spec.base_config["epochs"] == 2 and spec.num_samples == 3 and spec.workers == 2
    assert spec.scheduler["grace_period"] == 1 and spec.scheduler["max_t"] == 2
    assert spec.base_config["lr"] == 0.2


def test_distributions_and_pbt_clamp(tmp_path):
    raw = {"config": dict(TINY), "search_space": {
        "lr": {"loguniform": ["1e-3", 0.1]}, "dyrep_adjust_interval": {"randint": [1, 4]},
        "dyrep_metric": {"grid": ["synflow", "SNIP"]}},
        "scheduler": {"type": "pbt", "perturbation_interval": 1}}
    spec = load_sweep(_sweep(raw, tmp_path))
    assert spec.search_space["lr"].low == pytest.approx(1e-3)  # YAML 1.1 string "1e-3" accepted
    assert spec.search_space["dyrep_metric"].values == ("synflow", "snip")  # normalized like the config
    assert set(spec.mutations) == {"lr", "dyrep_adjust_interval", "dyrep_metric"}
    # PBT's x1.2 / x0.8 may leave the range or turn an int into a float: the trial config stays valid
    cfg = spec.trial_config({"lr": 0.5, "dyrep_adjust_interval": 4.8, "dyrep_metric": "snip"})
    assert cfg.lr == pytest.approx(0.1) and cfg.dyrep_adjust_interval == 3 and cfg.dyrep_metric == "snip"
    from ray import tune

    space = spec.param_space()
    assert isinstance(space["lr"], tune.search.sample.Float) and "grid_search" in space["dyrep_metric"]


@pytest.mark.parametrize("change, message", [
    ({"search_space": {"lrr": {"uniform": [0.1, 0.2]}}}, "unknown config key 'lrr' (did you mean 'lr'?)"),
    ({"search_space": {"lr": {"logunifrom": [0.1, 0.2]}}}, "unknown distribution 'logunifrom' (did you mean"),
    ({"search_space": {"lr": {"loguniform": [0, 0.2]}}}, "loguniform needs 0 < low < high"),
    ({"search_space": {"lr": {"uniform": [0.3, 0.2]}}}, "uniform needs low < high"),
    ({"search_space": {"lr": [0.1, 0.2]}}, "must be one distribution mapping"),
    ({"search_space": {"epochs": {"uniform": [1, 3]}}}, "is an integer key; use randint"),
    ({"search_space": {"dyrep_metric": {"choice": ["synflow", "snp"]}}}, "value 'snp' is invalid"),
    ({"search_space": {"momentum": {"uniform": [0.5, 1.5]}}}, "value 1.5 is invalid"),
    ({"search_space": {"dyrep_metric": {"uniform": [0, 1]}}}, "is not a number key"),
    ({"metric": "val_acc"}, "unknown metric 'val_acc'"),
    ({"mode": "maximize"}, "mode must be 'max' or 'min'"),
    ({"scheduler": {"type": "hyperband"}}, "unknown scheduler 'hyperband'"),
    ({"scheduler": {"type": "asha", "grace": 2}}, "scheduler.grace for asha (did you mean 'grace_period'?)"),
    ({"scheduler": {"type": "asha", "grace_period": 9}}, "must be <= scheduler.max_t"),
    ({"scheduler": {"type": "pbt", "quantile_fraction": 0.7}}, "scheduler.quantile_fraction must be a number"),
    ({"search_alg": {"type": "bayes"}}, "unknown search_alg 'bayes'"),
    ({"num_sample": 2}, "unknown key 'num_sample' (did you mean 'num_samples'?)"),
    ({"lr": 0.1}, "'lr' is an experiment config key: put it under 'config:'"),
    ({"config": {"lr": -1}}, "config key 'lr' must be > 0"),
    ({"base": "no_such_experiment.yaml"}, "base config 'no_such_experiment.yaml' not found"),
])
def test_sweep_errors_are_one_line(tmp_path, change, message):
    raw = {"config": {**TINY, "epochs": 3}, "search_space": {"lr": {"uniform": [0.01, 0.1]}}, **change}
    with pytest.raises(ConfigError) as info:
        load_sweep(_sweep(raw, tmp_path))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_deeply_nested_sweep_file_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("search_space: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert "too deeply" in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_sweep_exits_2(tmp_path, capsys):
    from dyrep_ray.cli import main

    path = _sweep({"search_space": {"lr": {"unifrm": [0.01, 0.1]}}}, tmp_path)
    assert main(["tune", "-c", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'uniform'?" in err
    assert main(["tune", "-c", str(SWEEPS / "demo.yaml"), "--set", "scheduler.reduction=2",
                 "--output", str(tmp_path / "out")]) == 2
    assert "did you mean 'reduction_factor'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a bad sweep


def test_unknown_model_in_search_space_fails_before_anything_runs(tmp_path, capsys):
    from dyrep_ray.cli import main
    from dyrep_ray.models import UnknownModelError
    from dyrep_ray.tune.sweep import preflight_sweep

    path = _sweep({"config": TINY, "search_space": {"model": {"choice": ["small_cnn", "no_such_model"]}}}, tmp_path)
    with pytest.raises(UnknownModelError, match="no_such_model"):
        preflight_sweep(load_sweep(path))
    assert main(["tune", "-c", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_directory_rules(tmp_path):
    from dyrep_ray.rundir.layout import SWEEP_FILE, TUNE_DIR
    from dyrep_ray.tune.sweep import prepare_sweep

    spec = load_sweep(SWEEPS / "demo.yaml")
    with pytest.raises(ConfigError, match="nothing to resume"):
        prepare_sweep(spec, str(tmp_path), "demo", resume=True)
    got, root = prepare_sweep(spec, str(tmp_path), "demo", resume=False)
    assert got is spec and root.root == str(tmp_path / "demo") and not (tmp_path / "demo").exists()
    (tmp_path / "demo" / TUNE_DIR).mkdir(parents=True)
    (tmp_path / "demo" / SWEEP_FILE).write_text(spec.to_json())
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        prepare_sweep(spec, str(tmp_path), "demo", resume=False)
    stored, _ = prepare_sweep(None, str(tmp_path), "demo", resume=True)  # --resume needs no sweep file
    assert stored.to_json() == spec.to_json() and stored.search_space == spec.search_space


# ------------------------------------------------------------------------------------- the bridge, no Ray


def _fake_checkpoint(path: Path, epoch: int, seed: int) -> Path:
    torch.manual_seed(seed)
    graph = {"blocks": [{"path": "features.0.0", "type": "dbb", "branches": ["kxk", "1x1"], "seed": seed}]}
    write_checkpoint_dir(path, state={"model": {"w": torch.randn(3)}}, meta={"epoch": epoch}, graph=graph)
    return path


def _tune_checkpoint(tmp_path: Path, name: str, trial_id: str, segment: int, epoch: int, seed: int) -> Path:
    """What BridgeCallback exports: the DyRep checkpoint files plus bridge.json."""
    directory = _fake_checkpoint(tmp_path / name, epoch, seed)
    info = {"trial_id": trial_id, "segment": segment, "run_dir": f"/runs/{trial_id}", "epoch": epoch,
            "source": f"/runs/{trial_id}/checkpoint_epoch{epoch:04d}", **checkpoint_fingerprint(directory)}
    (directory / BRIDGE_FILE).write_text(json.dumps(info))
    return directory


def test_plan_segment(tmp_path):
    sweep = tmp_path / "sweep"
    searched = {"lr": 0.03}
    # fresh start: the trial dir itself is the run dir (same layout as dyrep-ray train)
    seg = plan_segment(str(sweep), "t1", None, searched)
    assert (seg.index, seg.name, seg.run_dir) == (0, "t1", str(sweep / "t1"))
    (sweep / "t1").mkdir(parents=True)
    # restored from its own checkpoint: the same segment; Ray Train resumes that run
    own = _tune_checkpoint(tmp_path, "own", "t1", 0, 2, seed=0)
    assert plan_segment(str(sweep), "t1", own, searched).index == 0
    # restored from a donor's checkpoint (PBT exploit): a new segment starting from a verified copy
    donor = _tune_checkpoint(tmp_path, "donor", "t2", 0, 3, seed=1)
    seg = plan_segment(str(sweep), "t1", donor, searched)
    assert (seg.index, seg.run_dir) == (1, str(sweep / "t1" / "seg1"))
    start = Path(start_checkpoint_of(seg))
    assert start == sweep / "t1" / "seg1" / START_CHECKPOINT_DIR
    assert checkpoint_fingerprint(start) == checkpoint_fingerprint(donor)
    origin = json.loads((sweep / "t1" / "seg1" / ORIGIN_FILE).read_text())
    assert (origin["donor_trial_id"], origin["donor_epoch"], origin["config"]) == ("t2", 3, searched)
    # restarted before saving a checkpoint of its own: the same segment again, not a new one
    assert plan_segment(str(sweep), "t1", donor, searched).index == 1
    # exploited again (another donor checkpoint): the next segment
    donor2 = _tune_checkpoint(tmp_path, "donor2", "t2", 0, 4, seed=2)
    assert plan_segment(str(sweep), "t1", donor2, searched).index == 2
    # own checkpoint written in segment 2 -> segment 2; no checkpoint -> the newest segment
    own2 = _tune_checkpoint(tmp_path, "own2", "t1", 2, 5, seed=3)
    assert plan_segment(str(sweep), "t1", own2, searched).index == 2
    assert plan_segment(str(sweep), "t1", None, searched).index == 2


def test_plan_segment_rejects_tampered_donor(tmp_path):
    donor = _tune_checkpoint(tmp_path, "donor", "t2", 0, 3, seed=1)
    info = json.loads((donor / BRIDGE_FILE).read_text())
    info["graph_sha256"] = "0" * 64
    (donor / BRIDGE_FILE).write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="does not match"):
        plan_segment(str(tmp_path / "sweep"), "t1", donor, {})


# ------------------------------------------------------------------------------------------ real sweeps (Ray)


@pytest.mark.ray
def test_pbt_exploit_continues_from_donor_structure(ray_session, tmp_path, console_records):
    """lr=1e-4 cannot keep up with lr=0.05: at epoch 2 PBT (synch) clones the strong trial into the weak one."""
    from dyrep_ray.tune.sweep import run_sweep

    epochs = 3
    raw = {"name": "pbt", "config": {**TINY, "epochs": epochs, "sched": "none", "keep_checkpoints": 5},
           "search_space": {"lr": {"grid": [0.05, 0.0001]}},
           "resources": {"workers": 1, "use_gpu": False}, "max_concurrent_trials": 2,
           "scheduler": {"type": "pbt", "perturbation_interval": 2, "synch": True, "quantile_fraction": 0.5,
                         "resample_probability": 1.0, "hyperparam_mutations": {"lr": {"choice": [0.02, 0.03]}}}}
    out = run_sweep(load_sweep(_sweep(raw, tmp_path)), str(tmp_path), "pbt", console=SweepConsole(status_interval_s=0))
    sweep = tmp_path / "pbt"
    exploiters = [r for r in out.records if r.exploits >= 1]
    assert len(exploiters) == 1, [(r.trial_id, r.config, r.best_value) for r in out.records]
    weak = exploiters[0]
    seg1 = sweep / weak.trial_id / "seg1"
    origin = json.loads((seg1 / ORIGIN_FILE).read_text())
    donor, k = origin["donor_trial_id"], origin["donor_epoch"]
    assert donor != weak.trial_id and k == 2
    donor_ckpt = Path(origin["donor_checkpoint"])
    assert donor_ckpt == sweep / donor / f"checkpoint_epoch{k:04d}"  # the donor's own run, at the exploit

    # The structure graph the weak trial continued from is the donor's at that point (JSON), and so are the
    # weights and the optimizer state (momentum buffers).
    start = seg1 / START_CHECKPOINT_DIR
    assert json.loads((start / STRUCTURE_FILE).read_text()) == json.loads((donor_ckpt / STRUCTURE_FILE).read_text())
    started, original = load_checkpoint_dir(start), load_checkpoint_dir(donor_ckpt)
    assert len(started.graph["blocks"]) >= 1  # the donor had grown DBB blocks by then
    assert started.state["model"].keys() == original.state["model"].keys()
    assert all(torch.equal(started.state["model"][n], original.state["model"][n]) for n in original.state["model"])
    for name, buffers in original.state["optimizer"]["state"].items():
        for key, value in buffers.items():
            assert torch.equal(started.state["optimizer"]["state"][name][key], value), (name, key)
    assert checkpoint_fingerprint(start) == checkpoint_fingerprint(donor_ckpt)

    # Training continued from there: epochs k+1.. in the new segment, history 1..k inherited from the donor.
    history = run_metrics(seg1)
    assert [m["epoch"] for m in history] == list(range(1, epochs + 1))
    assert history[:k] == original.meta["history"][:k]
    own = sorted(p.name for p in seg1.glob("checkpoint_epoch*"))
    assert own[0] == f"checkpoint_epoch{k + 1:04d}" and len(own) == epochs - k
    first = load_checkpoint_dir(seg1 / own[0])
    assert first.meta["epoch"] == k + 1 and first.meta["history"][:k] == original.meta["history"][:k]

    # The mutated learning rate is in effect (sched=none: the reported lr is the configured one).
    new_lr = json.loads((seg1 / CONFIG_FILE).read_text())["lr"]
    assert new_lr in (0.02, 0.03) and new_lr == pytest.approx(weak.config["lr"]) == origin["config"]["lr"]
    assert [m["lr"] for m in history[k:]] == [pytest.approx(new_lr)] * (epochs - k)
    assert all(m["lr"] == pytest.approx(0.05) for m in history[:k])  # the donor's epochs ran with lr 0.05

    # Tune saw it: the weak trial's reports after the exploit name the donor and the epoch it came from.
    after = [r for r in weak.reported if r.get("segment") == 1]
    assert after and after[0]["epoch"] == k + 1
    assert all(r["pbt_donor"] == donor and r["pbt_donor_epoch"] == k for r in after)
    table = pd.read_csv(sweep / "trials.csv").set_index("trial_id")
    assert table.loc[weak.trial_id, "exploits"] == 1 and table.loc[weak.trial_id, "last_donor"] == donor
    # The console said so once, on the weak trial's first result after the exploit.
    exploit_lines = [m for m in console_records.messages() if "[PBT: continues" in m]
    assert exploit_lines == [m for m in exploit_lines if m.startswith(f"trial {weak.trial_id} epoch {k + 1}/")]
    assert len(exploit_lines) == 1 and f"continues {donor} epoch {k}" in exploit_lines[0]


@pytest.mark.ray
def test_errored_trial_does_not_stop_the_sweep(errored_sweep):
    """A worker of one trial raises mid-epoch (fault injection, no Train retries): the other trial finishes, the
    command succeeds and the table marks the errored one; ``--resume`` re-runs the errored trial to completion.
    (The sweep is the session's ``errored_sweep``, the demo sweep through ``dyrep-ray tune``: tests/test_console.py
    checks its console, tests/test_untrusted_input.py its signed files.)"""
    from tests.shared_runs import console_messages

    root, first, resumed = errored_sweep.root, errored_sweep.first, errored_sweep.resumed
    assert first.returncode == 0, first.stderr[-3000:]  # one trial completed: the sweep did its job
    assert (root / "fired").exists()
    table = pd.read_csv(errored_sweep.after_first / "trials.csv", keep_default_na=False).set_index("trial_id")
    assert sorted(table["status"]) == ["completed", "error"], table
    errored = table.index[table["status"] == "error"][0]
    good = table.index[table["status"] == "completed"][0]
    assert "injected fault" in table.loc[errored, "error"] and "\n" not in table.loc[errored, "error"]
    assert "trials: 1 completed, 1 error" in first.stdout.splitlines()
    best = [line for line in first.stdout.splitlines() if line.startswith("best: ")]
    assert len(best) == 1 and best[0].split()[1] == good and (errored_sweep.after_first / "best_config.yaml").is_file()
    # The console: one warning line for the failure, naming the cause; one line per result of the good trial.
    first_console = console_messages(first)
    failed = [m for m in first_console if m.startswith(f"trial {errored} failed")]
    assert len(failed) == 1 and "injected fault" in failed[0], first_console
    good_lines = [m for m in first_console if m.startswith(f"trial {good} epoch ")]
    assert [int(m.split()[3].split("/")[0]) for m in good_lines] == [1, 2]
    assert not [m for m in first_console if m.startswith(f"trial {errored} epoch ")]
    # --resume (Tuner.restore with resume_errored): the errored trial runs again (the fault fired once) and
    # finishes; the completed one is not re-run.  The resumed sweep shows this command's console (not the
    # pickled one of the first start): its lines name the re-run trial's epochs.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_console = console_messages(resumed)
    rerun = [m for m in resumed_console if m.startswith(f"trial {errored} epoch ")]
    assert [int(m.split()[3].split("/")[0]) for m in rerun] == [1, 2], resumed_console
    assert not [m for m in resumed_console if m.startswith(f"trial {good} ")]
    assert "trials: 2 completed" in resumed.stdout.splitlines()
    table = pd.read_csv(errored_sweep.sweep / "trials.csv").set_index("trial_id")
    assert table.loc[errored, "status"] == "completed" and table.loc[good, "status"] == "completed"
    assert table.loc[errored, "epochs"] == table.loc[good, "epochs"] == 2


def test_bridge_forwards_epoch_reports_and_skips_the_preemption_barrier():
    """A preemption checkpoint's report (every rank, mid-epoch) carries no val_top1 and names the unfinished
    epoch: forwarded, Tune would reject the result (metric missing) or end the trial early (epoch == epochs)."""
    import queue

    from dyrep_ray.distributed.preemption import PREEMPTED_METRIC
    from dyrep_ray.tune.bridge import BridgeCallback

    sent = queue.Queue()
    bridge = BridgeCallback(sent, "t0", 0, "/runs/t0", export=False)
    bridge._sent_controller = True  # outside a Train controller actor: no controller handle to send
    bridge.after_report(None, [{PREEMPTED_METRIC: 42, "epoch": 3}], None)
    assert sent.empty()
    bridge.after_report(None, [{"epoch": 3, "val_top1": 12.5}, {"epoch": 3, "val_top1": 12.5}], None)
    item = sent.get_nowait()
    assert item["metrics"] == {"epoch": 3, "val_top1": 12.5} and item["checkpoint_path"] is None
