"""Resume matrix (--local): {bn, online} x {EMA on, off} x {fp16 with its GradScaler state, no AMP} x {before the
first grow (a mid-epoch checkpoint), after a grow, after a cut}: a run resumed from each point ends equal to the
uninterrupted one -- structure, weights, every epoch's losses (EMA's too) and the loss scale.

One uninterrupted run per combination, shared by its three resume points: a callback copies the run directory
at each point (what a process that died right there leaves behind), and each copy is resumed with the same
config.  Tiny on purpose (3 steps of 16 8x8 images per epoch): fp16 convolutions are slow on a CPU."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dyrep_ray.engine.callbacks import TrainerCallback
from dyrep_ray.engine.loop import model_digest
from tests.helpers import RESUME_ATOL, final_model, max_abs_diff, run_local, run_metrics

BASE = ["synthetic_train_size=48", "synthetic_val_size=16", "batch_size=16", "image_size=8",
        "dyrep_recal_bn_iters=1", "epochs=3", "dyrep_grow_topk=1", "checkpoint_every_steps=2",
        "keep_checkpoints=5",
        # a block grown after epoch 1 has equal branch weights; one epoch later they differ and every branch
        # below the mean is cut: a grow after epoch 1, a cut (and a grow) after epoch 2
        "dyrep_cut_std_gate=0", "dyrep_cut_threshold=10"]
BLOCKS = {"bn": ["dyrep_block=bn"], "online": ["dyrep_block=online"]}
EMA = {"ema": ["model_ema=true", "model_ema_decay=0.9"], "no_ema": []}
AMP = {"fp16": ["amp=fp16", "dyrep_metric=grad_norm"], "fp32": []}  # synflow is refused under AMP
# where the run "dies": (epoch, step) of a mid-epoch checkpoint, or ("epoch", n) after epoch n's checkpoint
POINTS = {"before_first_grow": (0, 1), "after_grow": ("epoch", 0), "after_cut": ("epoch", 1)}
RESUMED_AT_STEP = {"before_first_grow": 2, "after_grow": 3, "after_cut": 6}  # global step of each point's checkpoint
EMA_KEYS = ("ema_val_loss", "ema_val_top1", "ema_val_top5")


@dataclass
class Snapshot(TrainerCallback):
    """Copies the run directory at each point, right after that point's checkpoint was written."""

    run_dir: Path
    out: Path

    def _copy(self, point: str) -> None:
        shutil.copytree(self.run_dir, self.out / point)

    def on_step_end(self, trainer, epoch, step, loss):
        for point, where in POINTS.items():
            if where == (epoch, step):  # checkpoint_every_steps=2: written after step index 1, before this hook
                self._copy(point)

    def on_checkpoint(self, trainer, epoch):
        for point, where in POINTS.items():
            if where == ("epoch", epoch):
                self._copy(point)


@pytest.mark.parametrize("amp", list(AMP))
@pytest.mark.parametrize("ema", list(EMA))
@pytest.mark.parametrize("block", list(BLOCKS))
def test_resumed_runs_equal_the_uninterrupted_one(tmp_path, block, ema, amp):
    """One combination: the uninterrupted run, then a resume from each of the three points (one test, so that
    the uninterrupted run is shared and the suite's workers split the matrix by combination)."""
    overrides = [*BASE, *BLOCKS[block], *EMA[ema], *AMP[amp]]
    run_local(tmp_path / "ref", overrides, [Snapshot(tmp_path / "ref", tmp_path / "points")])
    reference = run_metrics(tmp_path / "ref")
    ops = [[e["op"] for e in m["events"]] for m in reference]
    assert "grow" in ops[0] and "cut" in ops[1], ops  # the points are what their names say
    ref_model, ref_ckpt = final_model(tmp_path / "ref")
    for point in POINTS:
        _check_resume(tmp_path / "points" / point, point, overrides, reference, ref_model, ref_ckpt, ema, amp)


def _check_resume(snapshot: Path, point: str, overrides, reference, ref_model, ref_ckpt, ema, amp) -> None:
    assert snapshot.is_dir(), f"no snapshot at {point}"
    run_local(snapshot, overrides)  # the same config again: resumes from the snapshot's newest checkpoint
    resumed = run_metrics(snapshot)
    assert [m["epoch"] for m in resumed] == [1, 2, 3], point
    # it really continued from the snapshot's checkpoint (a fresh start would end equal too)
    starts = [m["start_global_step"] for m in resumed if "start_global_step" in m]
    assert starts[-1] == RESUMED_AT_STEP[point], (point, starts)
    assert [m["events"] for m in resumed] == [m["events"] for m in reference], point
    keys = ["train_loss", "val_loss", "val_top1", "params", "n_blocks", "skipped_steps"]
    for key in keys + (list(EMA_KEYS) if ema == "ema" else []):
        assert ([m[key] for m in resumed]
                == pytest.approx([m[key] for m in reference], rel=1e-6, abs=1e-9)), (point, key)
    new_model, new_ckpt = final_model(snapshot)
    assert new_ckpt.graph == ref_ckpt.graph, point
    assert max_abs_diff(ref_model.state_dict(), new_model.state_dict()) <= RESUME_ATOL, point
    assert model_digest(new_model) == model_digest(ref_model), point
    if amp == "fp16":
        ref_scaler, new_scaler = ref_ckpt.state["scaler"], new_ckpt.state["scaler"]
        assert float(torch.as_tensor(new_scaler["scale"])) == float(torch.as_tensor(ref_scaler["scale"])), point
        assert new_scaler["_growth_tracker"] == ref_scaler["_growth_tracker"], point
