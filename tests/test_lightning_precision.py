"""The Lightning callback under other devices and dtypes than the one its setup saw: the metric sums follow the
gradients (Lightning moves the module after the callbacks' setup), and BN re-calibration feeds a bf16-true model
inputs of its own dtype.  CPU runs of a few seconds; the CUDA case runs where a GPU is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from dyrep_ray.data.synthetic import build_synthetic  # noqa: E402
from dyrep_ray.integrations.lightning import DyRepCallback  # noqa: E402
from dyrep_ray.models import build_model  # noqa: E402
from dyrep_ray.rep.dbb import DiverseBranchBlock  # noqa: E402


class Classifier(pl.LightningModule):
    """``to_dtype``: the module converts itself in its own ``setup``, which Lightning calls after the callbacks'."""

    def __init__(self, to_dtype: torch.dtype | None = None):
        super().__init__()
        self.net = build_model("small_cnn", 10)
        self.to_dtype = to_dtype

    def setup(self, stage: str) -> None:
        if self.to_dtype is not None:
            self.to(self.to_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        weight = next(self.parameters())
        return F.cross_entropy(self(images.to(weight.dtype)).float(), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _fit(model: Classifier, image_size: int = 16, batch_size: int = 32, **trainer_args) -> DyRepCallback:
    train_ds, _, _ = build_synthetic(image_size=image_size, seed=0, train_size=2 * batch_size, val_size=8)
    callback = DyRepCallback(recal_bn_batches=2, seed=0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         devices=1, **trainer_args)
    trainer.fit(model, DataLoader(train_ds, batch_size=batch_size))
    return callback


def _sums(callback: DyRepCallback) -> list[torch.Tensor]:
    assert callback.dyrep is not None
    sums = list(callback.dyrep._sums.values())
    assert sums
    return sums


def test_metric_sums_follow_a_dtype_change_after_setup():
    callback = _fit(Classifier(to_dtype=torch.float64), accelerator="cpu")
    assert [e["op"] for e in callback.events] == ["grow"]
    # epoch 2 recorded float64 gradients: the sums are float64 too (not float32 from setup time)
    assert {s.dtype for s in _sums(callback)} == {torch.float64}
    assert all(torch.isfinite(s) for s in _sums(callback))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metric_sums_follow_the_module_to_cuda():
    callback = _fit(Classifier(), accelerator="gpu")
    assert [e["op"] for e in callback.events] == ["grow"]
    assert {s.device.type for s in _sums(callback)} == {"cuda"}


def test_bf16_true_recalibrates_new_branches_with_bf16_inputs():
    model = Classifier()
    callback = _fit(model, image_size=8, batch_size=4, accelerator="cpu", precision="bf16-true")
    assert [e["op"] for e in callback.events] == ["grow"]
    blocks = [m for m in model.modules() if isinstance(m, DiverseBranchBlock)]
    assert blocks and {p.dtype for b in blocks for p in b.parameters()} == {torch.bfloat16}
    running = [m.running_var for b in blocks for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert running and all(torch.isfinite(v.float()).all() for v in running)
