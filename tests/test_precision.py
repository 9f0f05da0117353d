"""Mixed precision and the DyRep metric in the training loop, on CPU: fp16 loss-scale overflows under each
``on_nonfinite`` mode (``torch.amp.GradScaler("cpu")``), and the TF32 switch ``dyrep_metric_fp32``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dyrep_ray.engine.callbacks import TrainerCallback
from dyrep_ray.engine.config import ConfigError, load_config
from dyrep_ray.engine.loop import NonFiniteLossError
from dyrep_ray.engine.precision import full_fp32, tf32_enabled, tf32_metric_warning
from tests.helpers import final_model, run_local, run_metrics

#: fp16 convolutions are slow on a CPU: 3 steps of 16 images of 8x8 per epoch.
FP16_MICRO = ["synthetic_train_size=48", "synthetic_val_size=16", "batch_size=16", "image_size=8",
              "dyrep_recal_bn_iters=1", "epochs=2", "amp=fp16", "dyrep_metric=grad_norm"]
OVERFLOW_SCALE = 2.0 ** 40  # far beyond fp16's range: every gradient overflows


@dataclass
class ScaleAt(TrainerCallback):
    """Set the loss scale the next step uses after the given (epoch, step)s: an overflow the scaler handles."""

    scales: dict

    def on_step_end(self, trainer, epoch, step, loss):
        if (epoch, step) in self.scales:
            trainer.scaler.update(new_scale=self.scales[epoch, step])


@dataclass
class HugeLossAt(TrainerCallback):
    """A finite loss so large that its fp16 gradients overflow at any loss scale."""

    at: tuple

    def transform_loss(self, trainer, epoch, step, loss):
        return loss * 1e36 if (epoch, step) == self.at else loss


ONE_OVERFLOW = ScaleAt({(0, 0): OVERFLOW_SCALE, (0, 1): 2.0 ** 8})  # step 1 of epoch 1 overflows, step 2 does not


def test_fp16_overflow_the_scaler_skips_does_not_stop_the_run(tmp_path):
    run_local(tmp_path / "r", [*FP16_MICRO, "on_nonfinite=stop"], [ONE_OVERFLOW])
    metrics = run_metrics(tmp_path / "r")
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[0]["skipped_steps"] == 1
    assert [e["op"] for e in metrics[0]["events"]] == ["grow"]
    model, _ = final_model(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_fp16_stop_still_stops_on_a_non_finite_loss(tmp_path):
    from dyrep_ray.engine.faults import NanLoss

    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_local(tmp_path / "r", [*FP16_MICRO, "on_nonfinite=stop"], [NanLoss(epoch=0, steps=1)])


def test_fp16_stop_stops_on_an_overflow_at_loss_scale_1(tmp_path):
    with pytest.raises(NonFiniteLossError, match="epoch 1 step 1"):
        run_local(tmp_path / "r", [*FP16_MICRO, "on_nonfinite=stop"],
                  [ScaleAt({(0, 0): 1.0}), HugeLossAt((0, 1))])


def test_fp16_overflow_under_ignore_does_not_poison_the_grow_decision(tmp_path):
    run_local(tmp_path / "r", [*FP16_MICRO, "on_nonfinite=ignore"], [ONE_OVERFLOW])
    metrics = run_metrics(tmp_path / "r")
    assert metrics[0]["skipped_steps"] == 0  # ignore counts nothing (no host sync)
    assert [e["op"] for e in metrics[0]["events"]] == ["grow"]  # not "no growth: non-finite metric"
    _, ckpt = final_model(tmp_path / "r")
    assert float(ckpt.state["dyrep"]["nonfinite_steps"]) == 0  # the interval after the adjust had no overflow


# ------------------------------------------------------------------------------------------------ TF32
@pytest.fixture()
def tf32_on():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_full_fp32_turns_tf32_off_inside_and_restores_it(tf32_on):
    with full_fp32(False):
        assert tf32_enabled() == ["cudnn", "matmul"]
    with pytest.raises(RuntimeError), full_fp32(True):
        assert tf32_enabled() == []
        raise RuntimeError("restored even after an error")
    assert tf32_enabled() == ["cudnn", "matmul"]


def test_tf32_warning_names_the_metric_and_the_switch(tf32_on):
    cfg = load_config(None, [])
    line = tf32_metric_warning(cfg, "cuda")
    assert line and "TF32 is on (cudnn, matmul)" in line and "synflow" in line and "dyrep_metric_fp32=true" in line
    assert "\n" not in line
    assert tf32_metric_warning(cfg, "cpu") is None
    assert tf32_metric_warning(cfg.replace(dyrep_metric_fp32=True), "cuda") is None
    assert tf32_metric_warning(cfg.replace(dyrep_metric="grad_norm"), "cuda") is None
    assert tf32_metric_warning(cfg.replace(dyrep=False), "cuda") is None
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    assert tf32_metric_warning(cfg, "cuda") is None


@dataclass
class RecordFlags(TrainerCallback):
    seen: dict

    def on_step_end(self, trainer, epoch, step, loss):
        self.seen.setdefault(epoch, set()).add(tuple(tf32_enabled()))


def test_dyrep_metric_fp32_runs_the_recording_epochs_without_tf32(tmp_path, tf32_on):
    seen: dict = {}
    run_local(tmp_path / "r", ["synthetic_train_size=64", "synthetic_val_size=32", "batch_size=32",
                               "dyrep_recal_bn_iters=1", "epochs=2", "dyrep_max_adjust_epochs=1",
                               "dyrep_metric_fp32=true"], [RecordFlags(seen)])
    assert seen == {0: {()}, 1: {("cudnn", "matmul")}}  # epoch 1 records the metric; epoch 2 does not
    assert tf32_enabled() == ["cudnn", "matmul"]


def test_dyrep_metric_fp32_is_a_boolean_key():
    assert load_config(None, ["dyrep_metric_fp32=true"]).dyrep_metric_fp32 is True
    with pytest.raises(ConfigError, match="dyrep_metric_fp32"):
        load_config(None, ["dyrep_metric_fp32=maybe"])
