"""Ray Train integration: 2 gloo workers, tiny synthetic data, adjust every epoch (one shared Ray instance)."""

from __future__ import annotations

import json

import pytest

from dyrep_ray.engine.loop import model_digest
from dyrep_ray.rundir.layout import STRUCTURE_FILE
from tests.helpers import RESUME_ATOL, final_model, max_abs_diff, run_metrics

pytestmark = pytest.mark.ray




def test_two_workers_grow_and_replicas_identical(ray_reference):
    out, cfg, summary = ray_reference
    run_dir = out / "ref"
    lines = run_metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    adjust_epochs = [m for m in lines if m["events"]]
    assert len(adjust_epochs) == 2  # after epochs 1 and 2 (none after the last)
    for m in adjust_epochs:
        digests = m["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], "replicas diverged after a structure change"
        assert all(e["op"] == "grow" and e["branches"] for e in m["events"])
    assert summary["grows"] == 2 and summary["deployed_params"] < summary["final_train_params"]
    assert lines[-1]["val_top1"] > 10.0  # above chance on 10 classes
    graph = json.loads((run_dir / STRUCTURE_FILE).read_text())
    model, ckpt = final_model(run_dir)
    assert ckpt.graph == graph
    assert ckpt.meta["epoch"] == 3


def test_worker_killed_at_an_epoch_start_resumes_from_the_epoch_checkpoint_exactly(ray_reference,
                                                                                   ray_worker_kills):
    """A real SIGKILL of rank 1 right at the start of epoch 3 (after two growths, before that epoch's mid-epoch
    checkpoint): Ray restarts the workers, they resume from the epoch-2 checkpoint -- even when Ray's controller
    had not yet registered it (the newest complete checkpoint in the run directory wins) -- and the run ends with
    the same weights and structure as the uninterrupted one.  The session's ``ray_worker_kills`` run
    (tests/shared_runs.py), whose first kill, mid-epoch 2, is tests/test_midepoch_ray.py's."""
    out, _, _ = ray_reference
    run_dir = ray_worker_kills.run_dir
    assert ray_worker_kills.epoch_start_kill.exists(), "the fault was not injected"
    reference_model, ckpt_a = final_model(out / "ref")
    resumed_model, ckpt_b = final_model(run_dir)
    assert ckpt_a.graph == ckpt_b.graph
    ref_state, new_state = reference_model.state_dict(), resumed_model.state_dict()
    worst = max_abs_diff(ref_state, new_state)
    assert worst <= RESUME_ATOL, worst
    lines = run_metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    restarted = lines[2]  # from epoch 2's end checkpoint: 2 epochs of 4 steps
    assert restarted["start_global_step"] == 8, restarted
    assert len(restarted["start_digests"]) == 2 and len(set(restarted["start_digests"])) == 1
    assert model_digest(reference_model) == model_digest(resumed_model)
    # the resume matrix's 2-worker case (bn blocks, no EMA, no AMP, after a grow): the losses agree too
    for key in ("train_loss", "val_loss", "n_blocks"):
        assert [m[key] for m in lines] == pytest.approx([m[key] for m in run_metrics(out / "ref")], rel=1e-6), key


def test_driver_killed_then_rerun_resumes_past_a_corrupt_checkpoint(ray_reference, driver_killed_rerun):
    """SIGKILL the `dyrep-ray train` process mid-epoch 3, truncate the newest checkpoint, re-run the same
    command: Ray restores the run, the workers skip the corrupt checkpoint (warning), resume from the previous
    valid one and end with the uninterrupted run's weights and structure.  (The session's ``driver_killed_rerun``
    re-runs it with ``--verbose``: tests/test_console.py reads that console.)"""
    out, cfg, _ = ray_reference
    run_dir, rerun = driver_killed_rerun.run_dir, driver_killed_rerun.rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    reference_model, ckpt_a = final_model(out / "ref")
    resumed_model, ckpt_b = final_model(run_dir)
    assert ckpt_a.graph == ckpt_b.graph
    ref_state, new_state = reference_model.state_dict(), resumed_model.state_dict()
    worst = max_abs_diff(ref_state, new_state)
    assert worst <= RESUME_ATOL, worst
    assert [m["epoch"] for m in run_metrics(run_dir)] == [1, 2, 3]
