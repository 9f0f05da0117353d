"""global_batch_size: the step, its randomness, BN statistics, DyRep metric and sample accounting do not depend on
the world size.  World sizes > 1 run as threads of this process taking turns between collectives
(:class:`ThreadWorld`): the real Trainer, deterministic, in seconds."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from dyrep_ray.engine.config import ConfigError, TrainConfig, load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.global_batch import (
    GlobalBatchSampler,
    SampleKeyedDataset,
    epoch_order,
    micro_batch_size,
    step_micro_batches,
)
from dyrep_ray.engine.global_step import epoch_sample_counts
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.rundir.storage import as_storage

TINY = ["synthetic_train_size=80", "synthetic_val_size=32", "image_size=16", "global_batch_size=32",
        "micro_batch_size=4", "dyrep_recal_bn_iters=1", "dyrep_adjust_interval=1", "epochs=2", "drop_rate=0.2",
        "debug_sample_record=true", "workers=[1,3]"]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("sets, match", [
    ({"global_batch_size": 64, "micro_batch_size": 7}, "7 does not divide 64"),
    ({"global_batch_size": 64, "batch_size": 16, "workers": 2}, "batch_size 16 x 2 worker"),
    ({"micro_batch_size": 8}, "applies only with global_batch_size"),
    ({"global_batch_size": 64, "lr_scale_with_workers": True, "workers": [1, 2]}, "lr_scale_with_workers=false"),
])
def test_inconsistent_global_batch_keys_are_one_clear_error(sets, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**sets)


def test_consistent_batch_size_and_default_micro_batch():
    assert TrainConfig(global_batch_size=64, batch_size=32, workers=[1, 2]).global_batch_size == 64
    assert micro_batch_size(64, None) == 8 and micro_batch_size(96, None) == 12 and micro_batch_size(12, None) == 3
    assert micro_batch_size(64, 16) == 16


# ------------------------------------------------------------------------------------- data by step index
def _rank_plans(n, world, start=0, epoch=0, global_batch=32, micro=4):
    out = {}
    for rank in range(world):
        sampler = GlobalBatchSampler(n, global_batch, micro, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(epoch, start)
        for step, micros in sampler.plan():
            out.setdefault(step, {}).update(dict(micros))
    return out


@pytest.mark.parametrize("world", [2, 3, 5, 9])
def test_a_step_is_the_same_micro_batches_at_every_world_size(world):
    one = _rank_plans(70, 1)
    assert _rank_plans(70, world) == one  # same step -> same micro-batch index -> same samples
    order = epoch_order(70, 3, 0)
    assert [one[s][j] for s in sorted(one) for j in sorted(one[s])] == [
        m for s in range(3) for m in step_micro_batches(order, s, 32, 4)]
    assert sorted(i for s in one.values() for m in s.values() for i in m) == list(range(70))


def test_resuming_at_another_world_size_sees_every_sample_once():
    first = {s: m for s, m in _rank_plans(70, 2).items() if s < 1}  # world 2 did step 0, then world 1 resumes
    rest = _rank_plans(70, 1, start=1)
    seen = [i for part in (first, rest) for s in part.values() for m in s.values() for i in m]
    assert sorted(seen) == list(range(70))


def test_augmentation_is_keyed_by_sample_not_by_what_the_process_drew_before():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + random.random(), i

    keyed = SampleKeyedDataset(Noisy(), seed=5)
    a = keyed[(1, 2)][0]
    torch.rand(7), random.random()  # another rank's history
    assert torch.equal(keyed[(1, 2)][0], a)
    assert not torch.equal(keyed[(2, 2)][0], a) and not torch.equal(keyed[(1, 3)][0], a)
    state = torch.get_rng_state()
    keyed[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is left as it was


# ---------------------------------------------------------------------------------- a world of threads
class ThreadWorld:
    """``n`` ranks as threads that take turns: one runs at a time, switching only inside a collective, so the
    run is deterministic (the global RNG included).  Sums go in rank order, as a ring of 2 would."""

    def __init__(self, n: int) -> None:
        self.n, self.lock, self.barrier = n, threading.Lock(), threading.Barrier(n)
        self.slots: list = [None] * n

    def exchange(self, rank: int, obj):
        self.slots[rank] = obj
        self.lock.release()
        self.barrier.wait()
        with self.lock:
            out = list(self.slots)
        self.barrier.wait()
        self.lock.acquire()
        return out


class ThreadContext(LocalContext):
    def __init__(self, world: ThreadWorld, rank: int, run_dir: Path) -> None:
        super().__init__(torch.device("cpu"), run_dir)
        self.world, self.rank, self.world_size = world, rank, world.n

    def wrap_model(self, model):
        """As DDP's constructor: rank 0's parameters and buffers on every rank."""
        state = self.world.exchange(self.rank, {k: v.clone() for k, v in model.state_dict().items()})[0]
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(state[key])
        return model

    def broadcast_object(self, obj):
        return self.world.exchange(self.rank, obj)[0]

    def gather_object(self, obj):
        return self.world.exchange(self.rank, obj)

    def all_reduce_sum(self, tensor):
        parts = self.world.exchange(self.rank, tensor.clone())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def report(self, metrics, epoch, write_checkpoint):
        if self.rank == 0:
            super().report(metrics, epoch, write_checkpoint)


def run_world(cfg: TrainConfig, run_dir: Path, world: int, stop_after_step: int | None = None) -> list:
    """Fit ``cfg`` on ``world`` ranks (threads); returns every rank's Trainer.  ``stop_after_step``: every rank
    raises after that global step's mid-epoch checkpoint (a lost group)."""
    if world == 1:
        trainer = Trainer.from_config(cfg, LocalContext(torch.device("cpu"), run_dir))
        _fit(trainer, stop_after_step)
        return [trainer]
    group = ThreadWorld(world)
    trainers: list = [None] * world
    errors: list = []

    def rank_main(rank: int) -> None:
        group.lock.acquire()
        try:
            trainers[rank] = Trainer.from_config(cfg, ThreadContext(group, rank, run_dir))
            _fit(trainers[rank], stop_after_step)
        except BaseException as exc:  # noqa: BLE001 - reported below, the others must not hang
            errors.append(exc)
            group.barrier.abort()
        finally:
            if group.lock.locked():
                group.lock.release()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    real = [e for e in errors if not isinstance(e, (threading.BrokenBarrierError, Stopped))]
    if real:
        raise real[0]
    return trainers


class Stopped(Exception):
    pass


def _fit(trainer: Trainer, stop_after_step: int | None) -> None:
    if stop_after_step is not None:
        original = trainer._step_end

        def step_end(epoch, step, steps, loss):
            original(epoch, step, steps, loss)
            if trainer.state.global_step >= stop_after_step:
                raise Stopped
        trainer._step_end = step_end  # type: ignore[method-assign]
    try:
        trainer.fit()
    except Stopped:
        pass


def _result(run_dir: Path, trainer: Trainer) -> dict:
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"structure": (run_dir / "structure.json").read_text(), "history": history,
            "state": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config at world 1, world 2 and world 3 (3 ranks, 8 micro-batches: uneven shares; the epoch's
    last step has 4 micro-batches), plus world 2 stopped after step 4 and resumed at world 1."""
    base = tmp_path_factory.mktemp("global")
    cfg = load_config(None, [*TINY, "checkpoint_every_steps=1"])
    out = {}
    for world in (1, 2, 3):
        trainers = run_world(cfg, base / f"w{world}", world)
        out[world] = _result(base / f"w{world}", trainers[0])
        out[f"metric{world}"] = trainers[0].dyrep.state_dict()
    run_world(cfg, base / "resize", 2, stop_after_step=4)  # epoch 2, step 1 of 3: mid-epoch checkpoint only
    trainers = run_world(cfg, base / "resize", 1)
    out["resize"] = _result(base / "resize", trainers[0])
    out["dirs"] = {k: base / k for k in ("w1", "w2", "w3", "resize")}
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.mark.parametrize("other", [2, 3, "resize"])
def test_same_structure_and_metrics_at_any_world_size(runs, other):
    one, many = runs[1], runs[other]
    assert many["structure"] == one["structure"]
    assert [m["events"] for m in many["history"]] == [m["events"] for m in one["history"]]
    assert [e for m in one["history"] for e in m["events"]], "the run must make a structure change to compare"
    for a, b in zip(one["history"], many["history"]):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-6  # eval sums in another order only
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6
        assert a["params"] == b["params"]
    # weights and BN running statistics: the float64 gradient sum makes them bit-identical here
    assert _max_diff(one["state"], many["state"]) <= 1e-6


def test_resumed_after_an_epochs_last_step_the_adjust_is_bit_identical(tmp_path):
    """Stopped after epoch 2's last step (global step 6 of 3 per epoch), the resumed process adjusts before it
    has trained a step, with blocks grown at epoch 1.  The BN hooks of the canonical update must not decide
    those blocks' forward path: left on after a step, they sent the uninterrupted run's recalibration through
    the per-branch forward and the resumed run's through the fused one (other rounding, a drift that grew)."""
    cfg = load_config(None, [*TINY, "epochs=3", "checkpoint_every_steps=1"])
    one = _result(tmp_path / "one", run_world(cfg, tmp_path / "one", 1)[0])
    run_world(cfg, tmp_path / "resumed", 1, stop_after_step=6)
    resumed = _result(tmp_path / "resumed", run_world(cfg, tmp_path / "resumed", 1)[0])
    assert one["history"][0]["events"] and one["history"][1]["events"], "grown at epoch 1, adjusted at epoch 2"
    assert resumed["structure"] == one["structure"]
    unequal = [k for k in one["state"] if not torch.equal(one["state"][k], resumed["state"][k])]
    assert not unequal, unequal


def test_no_bn_hook_outlives_a_step(tmp_path):
    """Between steps (evaluation, recalibration, an adjust) the blocks take the forward path they take in a
    process that has trained no step: the canonical update's BN hooks are removed at the end of each step."""
    from dyrep_ray.rep.blocks import is_block
    from dyrep_ray.rep.dbb_fused import fusable

    cfg = load_config(None, [*TINY, "checkpoint_every_steps=0"])
    trainer = run_world(cfg, tmp_path / "run", 1)[0]
    blocks = [m for m in trainer.model.modules() if is_block(m)]
    assert blocks, "grown at epoch 1, trained in epoch 2"
    hooked = [n for n, m in trainer.model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooked, hooked
    assert all(fusable(b) for b in blocks)


def test_bn_running_statistics_are_one_sequence_over_micro_batches(runs):
    """Without the canonical update world 2's rank 0 would hold the statistics of its own micro-batches only
    (every other one): far from world 1's."""
    bn_keys = [k for k in runs[1]["state"] if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    assert _max_diff({k: runs[1]["state"][k] for k in bn_keys}, {k: runs[2]["state"][k] for k in bn_keys}) <= 1e-5
    tracked = [k for k in runs[1]["state"] if k.endswith("num_batches_tracked")]
    assert all(int(runs[1]["state"][k]) == int(runs[3]["state"][k]) for k in tracked)


def test_dyrep_metric_sums_equal_what_one_worker_accumulates(runs):
    one, three = runs["metric1"], runs["metric3"]
    assert one["steps"] == three["steps"] and one["sums"].keys() == three["sums"].keys()
    for name, value in one["sums"].items():
        assert torch.allclose(value, three["sums"][name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("run", ["w2", "w3", "resize"])
def test_each_sample_is_computed_once_per_epoch(runs, run):
    storage = as_storage(runs["dirs"][run])
    for epoch in (0, 1):
        counts = epoch_sample_counts(storage, epoch)
        assert sorted(counts) == list(range(80)) and set(counts.values()) == {1}, (run, epoch)


def test_loss_transforms_reach_global_steps_and_a_nan_step_is_skipped(tmp_path):
    from dyrep_ray.engine.faults import NanLoss

    cfg = load_config(None, [*TINY, "epochs=1", "dyrep=false"])
    trainer = Trainer.from_config(cfg, LocalContext(torch.device("cpu"), tmp_path / "run"), callbacks=[NanLoss(0)])
    trainer.fit()
    assert trainer.state.skipped_steps == 1 and trainer.state.global_step == 2


def test_elastic_resize_interval_config_then_environment_then_ten_seconds(monkeypatch):
    from dyrep_ray.distributed.trainer import ELASTIC_RESIZE_ENV, elastic_resize_interval_s

    monkeypatch.delenv(ELASTIC_RESIZE_ENV, raising=False)
    assert elastic_resize_interval_s(None) == 10.0  # Ray's own default is 60 s
    monkeypatch.setenv(ELASTIC_RESIZE_ENV, "3")
    assert elastic_resize_interval_s(None) == 3.0
    assert elastic_resize_interval_s(TrainConfig(elastic_resize_monitor_interval_s=5).elastic_resize_monitor_interval_s
                                     ) == 5.0
    with pytest.raises(ConfigError, match="elastic_resize_monitor_interval_s"):
        TrainConfig(elastic_resize_monitor_interval_s=0)
    with pytest.raises(ConfigError, match="preemption_check_steps"):
        TrainConfig(preemption_check_steps=0)


def test_parquet_shards_under_a_global_batch_same_at_world_1_and_2(tmp_path):
    """Parquet under ``global_batch_size`` is read map-style by every rank (what a Ray worker runs): the same
    run at world 1 and world 2 (threads), every row once per epoch."""
    from dyrep_ray.data.parquet import export_parquet

    sizes = dict(synthetic_train_size=64, synthetic_val_size=16)
    for split in ("train", "val"):
        export_parquet("synthetic", None, tmp_path / split, split=split, rows_per_shard=24, seed=3, image_size=16,
                       **sizes)
    cfg = load_config(None, ["dataset=parquet", f"parquet_train={tmp_path / 'train'}",
                             f"parquet_val={tmp_path / 'val'}", "image_size=16", "global_batch_size=32",
                             "micro_batch_size=8", "dyrep_recal_bn_iters=1", "dyrep_adjust_interval=1", "epochs=2",
                             "debug_sample_record=true", "workers=[1,2]"])
    one = _result(tmp_path / "w1", run_world(cfg, tmp_path / "w1", 1)[0])
    two = _result(tmp_path / "w2", run_world(cfg, tmp_path / "w2", 2)[0])
    assert [e for m in one["history"] for e in m["events"]], "the run must make a structure change to compare"
    assert two["structure"] == one["structure"]
    assert _max_diff(one["state"], two["state"]) <= 1e-6
    for epoch in (0, 1):
        counts = epoch_sample_counts(as_storage(tmp_path / "w2"), epoch)
        assert sorted(counts) == list(range(64)) and set(counts.values()) == {1}, epoch
