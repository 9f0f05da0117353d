"""Faults, corrupt files and hostile inputs (no Ray: the Ray paths are in test_train_ray.py)."""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys

import pytest
import torch

from dyrep_ray.cli import main
from dyrep_ray.engine import checkpoint as ckpt_mod
from dyrep_ray.engine.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint_dir,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from dyrep_ray.engine.context import load_newest_valid
from dyrep_ray.engine.faults import InjectedFault, NanLoss, RaiseAt
from dyrep_ray.engine.loop import NonFiniteLossError
from dyrep_ray.rundir.layout import METRICS_FILE
from dyrep_ray.rundir.storage import RunStorage
from tests.helpers import RESUME_ATOL, run_local

TINY = ["synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
        "epochs=3", "keep_checkpoints=3"]


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_state(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f)


def _rewrite_manifest(directory):
    """Make the manifest match tampered files, so only the safe loader stands in the way."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": ckpt_mod.sha256_file(directory / name),
                                   "bytes": (directory / name).stat().st_size}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _run(run_dir, extra=(), callbacks=()):
    return run_local(run_dir, [*TINY, *extra], callbacks)[1]


def _small_checkpoint(tmp_path, name="checkpoint_epoch0001", epoch=1):
    return write_checkpoint_dir(tmp_path / name, state={"model": {"w": torch.ones(3)}},
                                meta={"epoch": epoch, "global_step": 1}, graph={"version": 1, "blocks": []})


# ---------------------------------------------------------------- corrupt files (unit level)
@pytest.mark.parametrize("damage", ["truncate", "delete_state", "break_graph_json", "delete_manifest"])
def test_damaged_checkpoint_is_detected_and_previous_used(tmp_path, damage, caplog):
    run = tmp_path / "run"
    _small_checkpoint(run, "checkpoint_epoch0001", 1)
    latest = _small_checkpoint(run, "checkpoint_epoch0002", 2)
    if damage == "truncate":
        data = (latest / STATE_FILE).read_bytes()
        (latest / STATE_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "delete_state":
        (latest / STATE_FILE).unlink()
    elif damage == "break_graph_json":
        (latest / "structure.json").write_text("{not json")
    else:
        (latest / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError):
        verify_checkpoint_dir(latest)
    loaded = load_newest_valid(RunStorage(str(tmp_path), "run"))
    assert loaded is not None and loaded.meta["epoch"] == 1
    assert "falling back" in caplog.text


def test_all_checkpoints_invalid_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    only = _small_checkpoint(run)
    (only / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none is valid"):
        load_newest_valid(RunStorage(str(tmp_path), "run"))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    directory = _small_checkpoint(tmp_path)
    _hostile_state(directory / STATE_FILE, marker)
    _rewrite_manifest(directory)
    verify_checkpoint_dir(directory)  # checksums pass: only weights_only loading protects us
    with pytest.raises(CheckpointError, match="cannot load safely"):
        load_checkpoint_dir(directory)
    assert not marker.exists()


def test_resume_with_hostile_checkpoint_exits_2_without_running_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    directory = _small_checkpoint(tmp_path / "out" / "hostile")
    _hostile_state(directory / STATE_FILE, marker)
    _rewrite_manifest(directory)
    rc = main(["train", "--local", "--output", str(tmp_path / "out"), "--name", "hostile", *sum(
        (["--set", kv] for kv in TINY), [])])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none is valid" in err[0]
    assert not marker.exists()


# ---------------------------------------------------------------- end-to-end faults (local loop)
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rel") / "ref"
    _run(run_dir)
    return load_checkpoint_dir(run_dir / "checkpoint_epoch0003")


def test_truncated_latest_checkpoint_resumes_from_previous_exactly(reference, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _run(run_dir, callbacks=[RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])
    latest = run_dir / "checkpoint_epoch0002"
    data = (latest / STATE_FILE).read_bytes()
    (latest / STATE_FILE).write_bytes(data[:100])  # bytes cut
    _run(run_dir)
    assert "falling back" in caplog.text
    final = load_checkpoint_dir(run_dir / "checkpoint_epoch0003")
    assert final.graph == reference.graph
    for k, v in reference.state["model"].items():
        assert torch.allclose(final.state["model"][k].double(), v.double(), rtol=0, atol=RESUME_ATOL), k
    assert [json.loads(x)["epoch"] for x in (run_dir / METRICS_FILE).read_text().splitlines()] == [1, 2, 3]


def test_disk_full_while_checkpointing_keeps_previous_valid(tmp_path, monkeypatch, caplog):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2's checkpoint: half-write, then ENOSPC
            with open(f, "wb") as fh:
                fh.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    run_dir = tmp_path / "run"
    _run(run_dir)
    assert "NOT written" in caplog.text and "No space left" in caplog.text
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert names == ["checkpoint_epoch0001", "checkpoint_epoch0003"]  # no partial epoch-2 directory
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    for name in names:
        verify_checkpoint_dir(run_dir / name)


def test_nonfinite_loss_is_skipped_and_never_drives_a_decision(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _run(run_dir, ["epochs=2"], [NanLoss(epoch=0, steps=3)])
    lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert lines[0]["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in load_checkpoint_dir(run_dir / "checkpoint_epoch0002")
               .state["model"].values() if v.is_floating_point())
    assert lines[0]["events"], "growth still happens from the finite steps' metrics"


def test_nonfinite_loss_stop_mode(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        _run(tmp_path / "run", ["on_nonfinite=stop"], [NanLoss(epoch=0, steps=1)])


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
BAD_INPUTS = [
    (["--set", "lrr=0.1"], "did you mean 'lr'"),
    (["--set", "epochs=abc"], "epochs"),
    (["--set", "epochs=0"], "epochs"),
    (["--set", "batch_size=-4"], "batch_size"),
    (["--set", "model=resnet19"], "resnet18"),
    (["--set", "dataset=cifar10", "--set", "data_dir=/nonexistent/cifar"], "data_dir"),
    (["--address", "127.0.0.1:9"], "unreachable"),
]


@pytest.mark.parametrize("args, needle", BAD_INPUTS)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--name", "x", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dyrep-ray: error:") and needle in err[0], err
    assert not out.exists()


@pytest.mark.ray
def test_more_workers_than_cluster_cpus(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--name", "x", "--workers", "64", "--cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "64 CPU workers requested" in err[0] and "--workers" in err[0]
    assert not out.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    """The console script path: exit status 2, one stderr line, no traceback (a corrupt CIFAR dir)."""
    bad = tmp_path / "cifar"
    (bad / "cifar-10-batches-py").mkdir(parents=True)
    (bad / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    proc = subprocess.run([sys.executable, "-m", "dyrep_ray.cli", "train", "--local", "--output",
                           str(tmp_path / "out"), "--name", "x", "--set", "dataset=cifar10", "--set",
                           f"data_dir={bad}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dyrep-ray: error:")]
    assert len(errors) == 1 and "cifar" in errors[0].lower(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_fault_with_a_marker_fires_in_one_process_only(tmp_path):
    """Two processes (two trials of a sweep) at the fault's step at once, both past the marker check: the marker is
    created exclusively, so the one that creates it fires and the other trains on."""
    marker = tmp_path / "fired"
    first, second = RaiseAt(epoch=0, marker=str(marker)), RaiseAt(epoch=0, marker=str(marker))
    with pytest.raises(InjectedFault, match="injected fault at epoch 0 on rank 0"):
        first.fire(0, 0)
    second.fire(0, 1)  # returns: the first one fired
    assert marker.read_text().startswith("raise at epoch 0 rank 0 pid ")

