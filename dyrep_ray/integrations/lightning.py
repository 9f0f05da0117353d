"""DyRep for PyTorch Lightning: one callback, no change to the LightningModule.

::

    from dyrep_ray.integrations.lightning import DyRepCallback

    trainer = L.Trainer(callbacks=[DyRepCallback()], strategy="ddp", ...)
    trainer.fit(model)                                   # grows / cuts at epoch ends
    trainer.fit(model, ckpt_path="last.ckpt")            # resumes with the grown structure

What the callback does, and where in Lightning's sequence:

* ``on_before_optimizer_step``: records the DyRep metric.  Lightning calls it after backward and,
  under AMP, after the precision plugin unscaled the gradients, so no loss scale is involved.
* ``on_train_epoch_end`` at an adjust point, on every rank, the trainer's own adjust sequence
  (:func:`dyrep_ray.engine.adjust.adjust_structure`): ``DyRep.plan()`` (all-reduces the
  metric), rank 0's plan broadcast with ``trainer.strategy.broadcast``, the DDP wrapper dropped,
  the plan applied (seeded init + BN recalibration + optimizer surgery on the Lightning-held
  optimizer), then ``DDPStrategy.configure_ddp()`` re-wraps the changed module (DDP cannot see new
  parameters; its constructor broadcasts rank 0's weights).  Checkpoint callbacks run after it
  (Lightning orders them last), so that epoch's checkpoint holds the new structure.
* Checkpoints: the structure graph goes into the checkpoint under :data:`GRAPH_KEY`, the DyRep
  accumulators into the callback's state.  Lightning loads the state_dict *before* any callback's
  ``on_load_checkpoint`` runs, and skips callbacks' ``on_save_checkpoint`` for weights-only
  checkpoints; only the LightningModule's own two hooks run in both cases, early enough.  So in
  ``setup`` the callback gives the module per-instance ``on_save_checkpoint`` (writes the graph)
  and ``on_load_checkpoint`` (rebuilds the structure) that then call the module's own hooks;
  ``teardown`` removes them.
  For ``LitModel.load_from_checkpoint`` outside a Trainer, call :func:`restore_structure` from the
  module's ``on_load_checkpoint``; doing both is harmless (the restore is idempotent).

Contract (as for :meth:`DyRep.apply`): exactly one optimizer, holding exactly the trainable
parameters of the LightningModule.  Surgery keeps group order canonical (parameter order), so an
optimizer that ``configure_optimizers`` builds on the restored structure matches the saved
``optimizer_states``.  Strategies: single device and DDP (``ddp``, ``ddp_spawn``, ...); not
``sync_batchnorm`` (new branches would get plain BatchNorm).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..engine.adjust import AdjustHooks, adjust_structure
from ..errors import UserError
from ..rep import DyRep, recalibrate_bn, restore_graph, structure_graph

logger = logging.getLogger(__name__)

GRAPH_KEY = "dyrep_structure_graph"
DEFAULT_RECAL_BN_BATCHES = 20
FIT_STAGE = "fit"

RecalBatches = Callable[["pl.Trainer", "pl.LightningModule"], Iterable[Tensor]]


class DyRepLightningError(UserError, ValueError):
    """The Trainer/LightningModule setup is one the DyRep callback cannot handle."""


def restore_structure(module: nn.Module, checkpoint: dict) -> bool:
    """Rebuild on ``module`` the structure saved in a Lightning ``checkpoint``; False if it holds none.

    Idempotent: a module that already has the checkpoint's structure is left alone.
    """
    graph = checkpoint.get(GRAPH_KEY)
    if graph is None:
        return False
    if structure_graph(module) != graph:
        restore_graph(module, graph)
    return True


def train_loader_images(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[Tensor]:
    """Default BN-recalibration source: the first element of each batch of the train DataLoader."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise DyRepLightningError(f"DyRepCallback: the train dataloader is a {type(loader).__name__}, not one "
                                  "DataLoader; pass DyRepCallback(recal_batches=fn) returning image tensors")
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield images.to(pl_module.device)


def as_param_dtype(batches: Iterable[Tensor], model: nn.Module) -> Iterator[Tensor]:
    """Floating-point inputs cast to ``model``'s parameter dtype: under ``precision="bf16-true"`` (or "16-true",
    "64-true") the module's weights are bf16 while a DataLoader yields float32 images, and the training step's
    own cast (the precision plugin's) does not run around BN re-calibration."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for images in batches:
        yield images.to(dtype) if dtype is not None and images.is_floating_point() else images


class DyRepCallback(pl.Callback):
    """Grows and cuts the LightningModule's convs with DyRep at epoch ends (see the module docstring).

    Args:
        adjust_every_n_epochs: adjust after every n-th epoch (never after the last one).
        max_adjust_epochs: no metric recording or adjusts after this many epochs (None: no limit).
        recal_bn_batches: batches used to estimate a new branch's BN statistics.
        recal_batches: ``fn(trainer, pl_module) -> iterable of input tensors`` for BN
            recalibration (default: images from the train DataLoader).
        **dyrep_options: passed to :class:`dyrep_ray.rep.DyRep` (metric, grow_topk, ...).
    """

    def __init__(self, *, adjust_every_n_epochs: int = 1, max_adjust_epochs: int | None = None,
                 recal_bn_batches: int = DEFAULT_RECAL_BN_BATCHES, recal_batches: RecalBatches | None = None,
                 **dyrep_options):
        if adjust_every_n_epochs < 1:
            raise DyRepLightningError(f"DyRepCallback: adjust_every_n_epochs must be >= 1, got "
                                      f"{adjust_every_n_epochs}")
        self.adjust_every_n_epochs = adjust_every_n_epochs
        self.max_adjust_epochs = max_adjust_epochs
        self.recal_bn_batches = recal_bn_batches
        self.recal_batches = recal_batches or train_loader_images
        self.dyrep_options = dict(dyrep_options)
        self.dyrep: DyRep | None = None
        self.events: list[dict] = []  # every applied grow/cut, with the epoch (1-based) it followed
        self._hooked: pl.LightningModule | None = None

    # ----------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != FIT_STAGE:
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
            raise DyRepLightningError(f"DyRepCallback supports single-device and DDP strategies, not "
                                      f"{type(strategy).__name__}; use strategy='ddp'")
        if getattr(strategy, "_layer_sync", None) is not None:
            raise DyRepLightningError("DyRepCallback does not support sync_batchnorm=True (grown branches would "
                                      "get plain BatchNorm); drop sync_batchnorm")
        if self.dyrep is None or self.dyrep.model is not pl_module:
            self.dyrep = DyRep(pl_module, **self.dyrep_options)
        else:  # a second fit() of the same module: keep the adjust count (it seeds the decisions)
            self.dyrep.refresh()
        self._install_module_hooks(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hooked is not None:
            del self._hooked.on_save_checkpoint, self._hooked.on_load_checkpoint  # back to the class's hooks
            self._hooked = None

    def _install_module_hooks(self, pl_module: pl.LightningModule) -> None:
        if self._hooked is pl_module:
            return
        own_save, own_load = pl_module.on_save_checkpoint, pl_module.on_load_checkpoint

        def save_graph_then_own_hook(checkpoint: dict) -> None:
            checkpoint[GRAPH_KEY] = structure_graph(pl_module)
            own_save(checkpoint)

        def restore_then_own_hook(checkpoint: dict) -> None:
            restore_structure(pl_module, checkpoint)
            own_load(checkpoint)

        # per-instance hooks on purpose (see the module docstring); teardown deletes them again
        pl_module.on_save_checkpoint = save_graph_then_own_hook  # type: ignore[method-assign]
        pl_module.on_load_checkpoint = restore_then_own_hook  # type: ignore[method-assign]
        self._hooked = pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise DyRepLightningError(f"DyRepCallback needs exactly one optimizer, got {len(trainer.optimizers)}")

    # ------------------------------------------------------------ training
    def _recording(self, trainer: pl.Trainer) -> bool:
        return self.max_adjust_epochs is None or trainer.current_epoch < self.max_adjust_epochs

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.dyrep is not None and self._recording(trainer):
            self.dyrep.record_metrics()  # gradients are unscaled here, also under AMP

    def is_adjust_epoch(self, trainer: pl.Trainer) -> bool:
        done = trainer.current_epoch + 1  # epochs completed once this epoch ends
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and done >= trainer.max_epochs
        return self._recording(trainer) and done % self.adjust_every_n_epochs == 0 and not last

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dyrep is None or not self.is_adjust_epoch(trainer):
            return
        strategy = trainer.strategy
        rewrap = isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel)

        def unwrap() -> None:  # drop the old DDP and its gradient hooks
            if rewrap:
                strategy.model = strategy.lightning_module

        def place() -> None:
            pl_module.to(strategy.root_device)

        def configure_ddp() -> None:  # DDP cannot see new parameters; its constructor broadcasts rank 0's weights
            if rewrap:
                cast(DDPStrategy, strategy).configure_ddp()

        def recal(model: nn.Module, bns: list) -> None:
            recalibrate_bn(model, as_param_dtype(self.recal_batches(trainer, pl_module), model), bns,
                           self.recal_bn_batches)

        hooks = AdjustHooks(broadcast=lambda plan: strategy.broadcast(plan, src=0), place=place, unwrap=unwrap,
                            rewrap=configure_ddp)
        # surgery keeps module order, so positional optimizer state stays right
        events = adjust_structure(self.dyrep, trainer.optimizers[0], recal, hooks).events
        epoch = trainer.current_epoch + 1
        self.events.extend({**event, "epoch": epoch} for event in events)
        for event in events:
            logger.info("DyRep after epoch %d: %s %s", epoch, event["op"], event["path"])

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        if self.dyrep is None:
            return {}
        return {"dyrep": self.dyrep.state_dict(), "events": list(self.events)}

    def load_state_dict(self, state_dict: dict) -> None:
        # Runs after the module's structure and weights were restored, so the re-scan sees the grown model.
        if self.dyrep is not None and "dyrep" in state_dict:
            self.dyrep.load_state_dict(state_dict["dyrep"])
            self.events = list(state_dict.get("events", []))
