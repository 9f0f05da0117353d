"""Mid-epoch checkpoints (``checkpoint_every_steps``): a real ``kill -9`` mid-epoch, resume at the next step.

``--local`` here; under Ray Train (2 workers) and across nodes in ``test_multinode.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dyrep_ray.engine.checkpoint import load_checkpoint_dir
from dyrep_ray.engine.data_source import EpochPosition, ResumableDistributedSampler
from dyrep_ray.engine.midepoch import is_mid_epoch_name
from tests.helpers import LOCAL_TINY, RESUME_ATOL, max_abs_diff, run_local, run_metrics

EVERY = 2  # 256 images / batch 32 = 8 steps per epoch: mid-epoch checkpoints after steps 2, 4 and 6
MID = [*LOCAL_TINY, f"checkpoint_every_steps={EVERY}", "keep_checkpoints=1"]
KILLED_EPOCH = 1  # 0-based: KillAt fires after step 8 // 2 = 4 (5 steps done), the checkpoint after 4 stays


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("steps_done", [0, 1, 3])
def test_resumed_sampler_gives_each_rank_the_rest_of_its_epoch(world, steps_done):
    dataset, batch = list(range(37)), 4
    for rank in range(world):
        sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.position = EpochPosition(steps_done, steps_done * batch * world, world)
        assert list(sampler) == full[steps_done * batch:]
        assert len(sampler) == len(full) - steps_done * batch


def test_resumed_sampler_after_a_resize_covers_exactly_the_unconsumed_samples():
    dataset = list(range(37))
    old = ResumableDistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=5)
    old.set_epoch(1)
    order = old._order()
    got = []
    for rank in range(3):
        new = ResumableDistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=True, seed=5)
        new.set_epoch(1)
        new.position = EpochPosition(2, 16, 2)  # 2 steps of batch 4 on 2 ranks
        got += list(new)
    assert set(got) == set(order[16:]) and len(got) - len(set(got)) < 3  # only the padding repeats


# --------------------------------------------------------------------------------------- kill -9, --local
KILL_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)  # as conftest does for the reference run: same float reduction order
from dyrep_ray.engine.faults import KillAt
from tests.helpers import run_local
run_local(sys.argv[1], sys.argv[3:], [KillAt(epoch={epoch}, marker=sys.argv[2])])
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mid") / "ref"
    run_local(run_dir, MID)
    return run_dir


def test_kill_9_mid_epoch_resumes_at_the_next_step_bit_identical(reference, tmp_path, caplog):
    run_dir, marker = tmp_path / "killed", tmp_path / "fired"
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(epoch=KILLED_EPOCH), str(run_dir), str(marker),
                           *MID], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL: a real process death
    assert marker.exists()
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    # epoch 1 + 4 steps of epoch 2 (global step 12); the older mid-epoch ones are gone, the epoch one stays
    assert names == ["checkpoint_epoch0001", "checkpoint_epoch0001_step000012"], names
    meta = json.loads((run_dir / names[1] / "meta.json").read_text())
    assert (meta["epoch"], meta["global_step"], meta["step_in_epoch"]) == (1, 12, 4)
    assert meta["mid_epoch"]["samples"] == 4 * 32 and meta["mid_epoch"]["world_size"] == 1

    with caplog.at_level("INFO", logger="dyrep_ray"):
        run_local(run_dir, MID)
    assert "checkpoint_epoch0001_step000012 (epoch 1 + 4 steps" in caplog.text
    final = load_checkpoint_dir(run_dir / "checkpoint_epoch0003")
    expected = load_checkpoint_dir(reference / "checkpoint_epoch0003")
    assert final.graph == expected.graph
    worst = max_abs_diff(final.state["model"], expected.state["model"])
    assert worst <= RESUME_ATOL, worst
    print(f"mid-epoch resume (--local): max |w - w_ref| = {worst:.3g}")
    ours, theirs = run_metrics(run_dir), run_metrics(reference)
    assert [m["epoch"] for m in ours] == [1, 2, 3]
    # the resumed epoch's loss is the uninterrupted epoch's: its first 4 steps came from the checkpoint
    assert [m["train_loss"] for m in ours] == pytest.approx([m["train_loss"] for m in theirs], rel=1e-12, abs=0)
    assert [m["val_top1"] for m in ours] == [m["val_top1"] for m in theirs]
    assert final.meta["global_step"] == expected.meta["global_step"] == 24
    assert not any(is_mid_epoch_name(p.name) for p in run_dir.iterdir())  # the run's end prunes them


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("setting, needle", [("workers=[4,2]", "1 <= min <= max"),
                                             ("checkpoint_every_steps=-1", "checkpoint_every_steps")])
def test_bad_cluster_settings_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, setting, needle):
    from dyrep_ray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    assert main(["train", "--output", str(out), "--name", "x", "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dyrep-ray: error:") and needle in err[0], err
    assert not out.exists()


def test_a_restarted_worker_takes_the_newest_complete_checkpoint_in_the_run_dir(tmp_path):
    """What a restarted Ray worker resumes from (``RayTrainContext.resume_checkpoint``): Ray hands it the newest
    checkpoint its controller registered, and a later complete one in the run directory wins -- also an epoch
    checkpoint that rank 0 finished while its report was still on the way when a worker died.  A corrupt later
    one is passed over (the registered one stands)."""
    from dyrep_ray.engine.midepoch import newer_checkpoint
    from dyrep_ray.rundir.storage import as_storage

    run_dir = tmp_path / "run"
    run_local(run_dir, [*LOCAL_TINY, "epochs=2", "keep_checkpoints=2"])
    first, second = (load_checkpoint_dir(run_dir / f"checkpoint_epoch000{k}") for k in (1, 2))
    storage = as_storage(run_dir)
    newer = newer_checkpoint(storage, first)
    assert newer is not None and newer.meta["epoch"] == 2 and newer.meta["global_step"] == second.meta["global_step"]
    assert newer_checkpoint(storage, second) is None  # nothing is newer than the newest
    state = run_dir / "checkpoint_epoch0002" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert newer_checkpoint(storage, first) is None
