"""The training step's hot path: EMA in foreach ops, clipping only when configured, no batch kept alive past its
step, cuDNN autotuning on CUDA."""

from __future__ import annotations

import copy
import weakref
from collections import deque

import pytest
import torch

from dyrep_ray.distributed.ray_data import ShardBatches
from dyrep_ray.engine import assembly, loop
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.data_source import TorchDataSource
from dyrep_ray.engine.ema import ModelEma
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.models import build_model

MICRO = ["synthetic_train_size=96", "synthetic_val_size=32", "batch_size=32", "epochs=1", "dyrep=false"]


def _trainer(tmp_path, overrides=(), data=None) -> Trainer:
    cfg = load_config(None, [*MICRO, *overrides])
    return Trainer.from_config(cfg, LocalContext(torch.device("cpu"), tmp_path / "run", 1), data=data)


def test_ema_foreach_update_equals_per_tensor_lerp_bitwise():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    ema = ModelEma(model, 0.9)
    reference = copy.deepcopy(ema.module)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for b in model.buffers():
                b.add_(1)  # running stats and the integer num_batches_tracked
        ema.update(model)
        ref_state = reference.state_dict()
        for name, value in model.state_dict().items():  # the former per-tensor update
            if value.dtype.is_floating_point:
                ref_state[name].lerp_(value, 1.0 - 0.9)
            else:
                ref_state[name].copy_(value)
    got, want = ema.module.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    tracked = [v for k, v in got.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 3 for v in tracked)


def test_no_clip_grad_norm_call_unless_clipping_is_configured(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def counting(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    _trainer(tmp_path / "a").fit()  # on_nonfinite=skip (default) still checks the norm, without clipping
    assert calls == []
    _trainer(tmp_path / "b", ["clip_grad=0.5"]).fit()
    assert calls == [0.5] * 3


def test_nonfinite_gradient_without_clipping_is_still_skipped(tmp_path):
    trainer = _trainer(tmp_path)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    images, targets = next(iter(trainer.data.train_batches(0)))
    images = images.clone()
    images[0, 0, 0, 0] = float("nan")
    loss, _, taken = trainer.train_step(images, targets, epoch=0, step=0)
    assert not taken and not torch.isfinite(loss) and trainer.state.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())


class WatchedBatches:
    """Batches of a TorchDataSource; on every fetch, the previously handed-out batch must be gone."""

    def __init__(self, loader):
        self.it, self.last, self.fetches = iter(loader), None, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.last is not None:
            assert all(ref() is None for ref in self.last), "the previous batch is still referenced"
        images, targets = next(self.it)
        self.last = (weakref.ref(images), weakref.ref(targets))
        self.fetches += 1
        return images, targets


class WatchedSource(TorchDataSource):
    watched: list[WatchedBatches] = []

    def train_batches(self, epoch, position=None):
        batches = WatchedBatches(super().train_batches(epoch, position))
        self.watched.append(batches)
        return batches


def test_a_batch_is_released_before_the_next_one_is_fetched(tmp_path):
    def factory(cfg, ctx):
        return WatchedSource.from_config(cfg, ctx)

    WatchedSource.watched = []
    _trainer(tmp_path, data=factory).fit()
    assert [w.fetches for w in WatchedSource.watched] == [3]


def test_ray_shard_batches_skip_keep_only_the_tail_and_hold_nothing():
    made = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(6)]
    refs = [weakref.ref(b[0]) for b in made]
    recent: deque[torch.Tensor] = deque(maxlen=2)
    batches = ShardBatches(iter(made), skip=1, keep_from=3, recent=recent)
    del made
    seen = []
    for images, _ in batches:
        seen.append(float(images[0, 0]))
        del images
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [float(t[0, 0]) for t in recent] == [4.0, 5.0]
    # batches 0-3 are referenced by nobody (4 and 5 by the recalibration deque only)
    assert [r() is None for r in refs] == [True, True, True, True, False, False]


def test_cudnn_benchmark_set_on_cuda_only_and_again_at_every_placement(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assembly.tune_kernels(torch.device("cpu"), True)
    assert torch.backends.cudnn.benchmark is False
    assembly.tune_kernels(torch.device("cuda"), True)  # a device object: no GPU needed to set the flag
    assert torch.backends.cudnn.benchmark is True
    assembly.tune_kernels(torch.device("cuda"), False)
    assert torch.backends.cudnn.benchmark is False
    calls = []
    monkeypatch.setattr(loop, "tune_kernels", lambda device, on: calls.append((device.type, on)))
    trainer = _trainer(tmp_path, ["cudnn_benchmark=false"])
    trainer._place_model()  # what an adjust's place hook runs after the structure changed
    assert calls == [("cpu", False)]


@pytest.mark.parametrize("value", ["true", "false"])
def test_cudnn_benchmark_key(value):
    assert load_config(None, [f"cudnn_benchmark={value}"]).cudnn_benchmark is (value == "true")
