"""Mid-epoch checkpoints under Ray Train (2 gloo workers): rank 1 is SIGKILLed mid-epoch, Ray restarts the
workers, they resume from the mid-epoch checkpoint at the next step and end with the uninterrupted weights."""

from __future__ import annotations

import pytest

from dyrep_ray.engine.loop import model_digest
from tests.helpers import RESUME_ATOL, final_model, max_abs_diff, run_metrics

pytestmark = pytest.mark.ray


def test_ray_worker_killed_mid_epoch_resumes_from_mid_epoch_checkpoint(ray_reference, ray_worker_kills):
    """Killed and resumed from a mid-epoch checkpoint, the run ends as the uninterrupted one (which wrote no
    mid-epoch checkpoints: they change nothing in the training).  The session's ``ray_worker_kills`` run
    (tests/shared_runs.py): 256 images / 2 workers / batch 32 = 4 steps per epoch, a mid-epoch checkpoint after
    step 2; rank 1 is SIGKILLed after step 3 of epoch 2, so the restart resumes at global step 4 + 2."""
    reference_out, _, _ = ray_reference
    run_dir = ray_worker_kills.run_dir
    assert ray_worker_kills.mid_epoch_kill.exists(), "the fault was not injected"
    ref_model, ref_ckpt = final_model(reference_out / "ref")
    model, ckpt = final_model(run_dir)
    assert ckpt.graph == ref_ckpt.graph
    worst = max_abs_diff(ref_model.state_dict(), model.state_dict())
    assert worst <= RESUME_ATOL, worst
    print(f"mid-epoch resume (Ray Train, 2 workers): max |w - w_ref| = {worst:.3g}")
    assert model_digest(ref_model) == model_digest(model)
    lines, ref_lines = run_metrics(run_dir), run_metrics(reference_out / "ref")
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert [m["train_loss"] for m in lines] == pytest.approx([m["train_loss"] for m in ref_lines], rel=1e-12)
    # the restart resumed from the mid-epoch checkpoint of epoch 2 (global step 4 + 2), not from epoch 1's end
    restarted = lines[1]
    assert restarted["start_global_step"] == 6, restarted
    assert len(restarted["start_digests"]) == 2 and len(set(restarted["start_digests"])) == 1
    assert restarted["world_size"] == 2 and len(restarted["rank_nodes"]) == 2


def test_elastic_minimum_above_the_cluster_is_one_line_exit_2(ray_session, tmp_path, capsys):
    from dyrep_ray.cli import main

    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--name", "x", "--set", "workers=[64,80]", "--cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "minimum of 64 CPU workers" in err[0] and "workers=[64,80]" in err[0], err
    assert not out.exists()
