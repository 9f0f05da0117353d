"""The DyRep training loop: one implementation for Ray Train workers and ``--local``.

:func:`~dyrep_ray.engine.assembly.build_run` builds the run's parts; :class:`Trainer` only runs them (train,
evaluate, adjust, checkpoint).

:class:`Trainer` meets its runtime only through a :class:`~dyrep_ray.engine.protocols.TrainContext` (DDP
wrapping, rank 0's plan broadcast, reductions, checkpoint persistence) and its data only through a
:class:`~dyrep_ray.engine.protocols.DataSource`; anything else that watches or steers training (console output,
tracking, fault injection) is a :class:`~dyrep_ray.engine.callbacks.TrainerCallback`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import count_macs, count_params
from ..rep import recalibrate_bn, structure_graph
from ..rundir.files import VAL_KEYS, CheckpointMeta, EpochMetrics
from ..rundir.layout import CONFIG_FILE, METRICS_FILE, STRUCTURE_FILE
from .adjust import AdjustHooks, adjust_structure
from .assembly import RunParts, build_run, count_blocks, place_model, tune_kernels
from .callbacks import CallbackList, TrainerCallback
from .checkpoint import optimizer_state_by_name, rng_state, write_checkpoint_dir
from .compile import compile_model
from .config import TrainConfig
from .data_source import EpochPosition
from .global_epoch import train_global_epoch
from .global_step import CanonicalBatchNorm, SampleRecord
from .midepoch import (
    MID_EPOCH_KEY,
    STEP_IN_EPOCH_KEY,
    EpochProgress,
    mid_epoch_dir_name,
    write_mid_epoch_checkpoint,
)
from .precision import full_fp32, tf32_metric_warning
from .protocols import DataFactory, DataSource, TrainContext
from .state import TrainState
from .summary import summarize

logger = logging.getLogger(__name__)

# Salt of the per-epoch BN recalibration (dyrep_recal_bn_every_epoch), apart from the adjust salts.
EPOCH_RECAL_SALT = 10_000


class NonFiniteLossError(RuntimeError):
    """Raised with ``on_nonfinite: stop`` when a step produces a non-finite loss/gradient."""


@dataclass
class RunningEpoch:
    """The epoch in progress on this rank: what a mid-epoch checkpoint records and a resume restores."""

    epoch: int
    step: int = 0  # steps done in this epoch (skipped ones included)
    samples: int = 0  # entries of the epoch's sample order consumed by all ranks together
    world_size: int = 1  # world size the samples were consumed with (for the sampler position)
    loss_sum: torch.Tensor | None = None  # float64 on the device; summed without a host sync
    images: int = 0
    steps_done: int = 0


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Runs one rank's finished :class:`RunParts` in ``ctx``; :meth:`fit` runs all epochs.

    ``callbacks``: :class:`TrainerCallback` instances.  :meth:`from_config` assembles the parts first.
    """

    def __init__(self, parts: RunParts, ctx: TrainContext, callbacks: Iterable[TrainerCallback] = ()):
        self.callbacks = CallbackList(callbacks)
        self.cfg, self.ctx = parts.cfg, ctx
        self.device = parts.device
        self.data: DataSource = parts.data
        self.num_classes = parts.num_classes
        self.model = parts.model
        self.plain_params, self.plain_macs = parts.plain_params, parts.plain_macs
        self.channels_last = parts.channels_last
        self.dyrep = parts.dyrep
        self.optimizer = parts.optimizer
        self.schedule = parts.schedule
        self.scaler = parts.scaler
        self.ema = parts.ema
        self.state: TrainState = parts.state
        self._resume_progress: EpochProgress | None = parts.resume_progress  # set by a mid-epoch checkpoint
        self.running: RunningEpoch | None = None
        self._start_record: dict | None = None  # placement + digests of this (re)start, for the next epoch
        self._rank_nodes: list = []
        self.canonical_bn: CanonicalBatchNorm | None = None  # global_batch_size: BN statistics over micro-batches
        self.sample_record: SampleRecord | None = None  # debug_sample_record: this epoch's sample ids
        self.wrapped = self._wrap("at the start")

    def _wrap(self, reason: str) -> nn.Module:
        """The context's wrapper (DDP) of the model, under torch.compile with ``compile: true``."""
        wrapped = self.ctx.wrap_model(self.model)
        return compile_model(wrapped, reason) if self.cfg.compile else wrapped

    @classmethod
    def from_config(cls, cfg: TrainConfig, ctx: TrainContext, data: DataSource | DataFactory | None = None,
                    callbacks: Iterable[TrainerCallback] = ()) -> Trainer:
        """Assemble the run ``cfg`` describes (:func:`~dyrep_ray.engine.assembly.build_run`), ready to fit."""
        callbacks = CallbackList(callbacks).callbacks  # a wrong callback fails before the data and model are built
        return cls(build_run(cfg, ctx, data), ctx, callbacks)

    def _place_model(self) -> None:
        place_model(self.model, self.device, self.channels_last)
        tune_kernels(self.device, self.cfg.cudnn_benchmark)

    # ---------------------------------------------------------------- data
    def _recal_batches(self, salt: int) -> Iterator[torch.Tensor]:
        for images in self.data.recal_batches(salt):
            yield self._to_device(images)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _recal_fn(self, salt: int, iters: int | None = None):
        iters = iters or self.cfg.dyrep_recal_bn_iters

        def recal(model: nn.Module, bns: list[nn.BatchNorm2d]) -> None:
            with _autocast(self.cfg, self.device):
                recalibrate_bn(model, self._recal_batches(salt), bns, iters)
        return recal

    # ------------------------------------------------------------- checkpoints
    def _checkpoint_writer(self, metrics: dict, extra: dict | None = None):
        # Snapshot now (tensors cloned to CPU) so later training cannot alter what is written.
        state = {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state_by_name(self.optimizer, self.model),
            "rng": rng_state(),
        }
        if self.dyrep is not None:
            state["dyrep"] = self.dyrep.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        meta = CheckpointMeta(epoch=self.state.epoch, global_step=self.state.global_step,
                              history=self.state.history, metrics=metrics, config=self.cfg.to_dict(),
                              skipped_steps=self.state.skipped_steps, plain_params=self.plain_params,
                              num_classes=self.num_classes, extra=dict(extra or {})).to_json()
        graph = structure_graph(self.model)

        def write(path: Path) -> None:
            write_checkpoint_dir(path, state=state, meta=meta, graph=graph)
        return write

    def save_mid_epoch_checkpoint(self) -> str | None:
        """Every rank, between two steps: rank 0 writes a checkpoint of the epoch in progress (one gather of
        every rank's running sums).  Returns its name on rank 0 (None elsewhere or if it was not written)."""
        running = self.running
        assert running is not None, "mid-epoch checkpoints exist only inside an epoch"
        loss = float(running.loss_sum) if running.loss_sum is not None else 0.0
        if self.sample_record is not None:  # every rank: the sample ids of the steps this checkpoint commits
            self.sample_record.write()
        shares = self.ctx.gather_object((loss, running.images, running.steps_done))
        progress = EpochProgress(step=running.step, samples=running.samples, world_size=self.ctx.world_size,
                                 loss_sums=[s[0] for s in shares], images=[s[1] for s in shares],
                                 steps_done=[s[2] for s in shares])
        if not self.ctx.is_main:
            return None
        name = mid_epoch_dir_name(self.state.epoch, self.state.global_step)
        writer = self._checkpoint_writer({}, extra={STEP_IN_EPOCH_KEY: running.step,
                                                    MID_EPOCH_KEY: progress.to_json()})
        if not write_mid_epoch_checkpoint(self.ctx.storage, name, writer):
            return None
        logger.info("mid-epoch checkpoint %s (epoch %d, step %d)", name, running.epoch + 1, running.step)
        return name

    def _take_placement_record(self) -> dict:
        record, self._start_record = self._start_record, None
        if record is None:
            record = {"world_size": self.ctx.world_size, "rank_nodes": self._rank_nodes}
        self._rank_nodes = record["rank_nodes"]
        return record

    def _step_end(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
        every = self.cfg.checkpoint_every_steps
        if every and (step + 1) % every == 0 and step + 1 < steps:  # the epoch's end has its own checkpoint
            self.save_mid_epoch_checkpoint()
        self.callbacks.on_step_end(self, epoch, step, loss)

    # ---------------------------------------------------------------- epochs
    def fit(self) -> dict:
        cfg = self.cfg
        if self.ctx.is_main:
            self._write_run_files()
            logger.info("model %s: %d params, %.1f MMACs, %d DyRep-eligible convs; %d train / %d val images, "
                        "%d worker(s)", cfg.model, self.plain_params, self.plain_macs / 1e6,
                        len(self.dyrep.eligible_names) if self.dyrep else 0, *self.data.sizes,
                        self.ctx.world_size)
            tf32_note = tf32_metric_warning(cfg, self.device.type)
            if tf32_note:
                logger.warning(tf32_note)
        self._start_record = self._placement_record(start=True)
        self.callbacks.on_fit_start(self)
        while self.state.epoch < cfg.epochs:
            self._run_epoch(self.state.epoch)
        summary = self.summary()
        self.callbacks.on_fit_end(self, summary)
        return summary

    def _placement_record(self, start: bool) -> dict:
        """Where this worker group runs (every rank's node id) and, at a (re)start, every rank's structure +
        weights digest: replicas must agree after every restart and every elastic resize, not only after adjusts.
        Collective (every rank calls it); recorded in the next epoch's metrics."""
        node = getattr(self.ctx, "node_id", None)
        record = {"world_size": self.ctx.world_size, "rank_nodes": self.ctx.gather_object(node)}
        if start:
            record["start_global_step"] = self.state.global_step
            record["start_digests"] = self.ctx.gather_object(model_digest(self.model))
        return record

    def _lr_factor(self) -> float:
        """Linear scaling with the current worker count (elastic runs, ``lr_scale_with_workers``): the
        configured lr is the lr at ``max_workers``; the per-worker batch is fixed, so the global batch scales."""
        if not self.cfg.lr_scale_with_workers:
            return 1.0
        return self.ctx.world_size / self.cfg.max_workers

    def _is_adjust_epoch(self, epoch: int) -> bool:
        cfg = self.cfg
        return (self.dyrep is not None and (epoch + 1) % cfg.dyrep_adjust_interval == 0
                and epoch + 1 <= cfg.dyrep_max_adjust_epochs and epoch + 1 < cfg.epochs)

    def _run_epoch(self, epoch: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        record = self.dyrep is not None and epoch < cfg.dyrep_max_adjust_epochs
        with full_fp32(record and cfg.dyrep_metric_fp32):
            train_loss, n_images, lr = self._train_one_epoch(epoch, record)
        train_time = time.perf_counter() - t0
        events, adjust_time = [], 0.0
        replica_digests = None
        if self._is_adjust_epoch(epoch):
            t_adj = time.perf_counter()
            events = self._adjust(epoch)
            adjust_time = time.perf_counter() - t_adj
            # Proof that every rank holds the same structure and weights after the change.
            replica_digests = ctx.gather_object(model_digest(self.model))
            self.callbacks.on_adjust(self, epoch, events)
        # The original's per-epoch recalibration (its RepVGG-A2 command): every BN, on epochs without an adjust,
        # while structure changes are still possible -- inside its DyRep branch, so never without DyRep unless
        # recal_bn_without_dyrep.
        if (cfg.dyrep_recal_bn_every_epoch and (self.dyrep is not None or cfg.recal_bn_without_dyrep)
                and not self._is_adjust_epoch(epoch) and epoch < cfg.dyrep_max_adjust_epochs):
            self._recal_fn(EPOCH_RECAL_SALT + epoch, cfg.dyrep_recal_bn_every_epoch_iters)(
                self.model, [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
        val = self.evaluate(self.model)
        epoch_time = time.perf_counter() - t0
        epoch_metrics = EpochMetrics(
            epoch=epoch + 1, train_loss=train_loss, **{k: val[k] for k in VAL_KEYS}, lr=lr,
            params=count_params(self.model), n_blocks=count_blocks(self.model),
            epoch_time_s=round(epoch_time, 3), train_time_s=round(train_time, 3),
            adjust_time_s=round(adjust_time, 3), images_per_s=round(n_images / max(train_time, 1e-9), 1),
            skipped_steps=self.state.skipped_steps, events=events, replica_digests=replica_digests,
            ema=self.evaluate(self.ema.module) if self.ema is not None else None,
            extra=self._take_placement_record())
        metrics = epoch_metrics.to_json()
        self.state.epoch = epoch + 1
        self.state.history.append(metrics)
        last = self.state.epoch == cfg.epochs
        writer = self._checkpoint_writer(metrics) if (self.state.epoch % cfg.checkpoint_every == 0 or last) else None
        if ctx.is_main:
            self._write_run_files()
            logger.info("epoch %d/%d  loss %.4f  val_top1 %.2f  val_loss %.4f  lr %.5f  params %d  blocks %d  "
                        "%.1f img/s  %.1fs%s", epoch + 1, cfg.epochs, train_loss, val["val_top1"], val["val_loss"],
                        lr, metrics["params"], metrics["n_blocks"], metrics["images_per_s"], epoch_time,
                        "".join(f"  [{e['op']} {e['path']}]" for e in events))
        self.callbacks.on_epoch_end(self, metrics)
        ctx.report(metrics, epoch + 1, writer)
        if writer is not None:
            self.callbacks.on_checkpoint(self, epoch)

    def _train_one_epoch(self, epoch: int, record: bool) -> tuple[float, int, float]:
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        steps = self.data.steps_per_epoch
        running = self.running = RunningEpoch(epoch=epoch, world_size=ctx.world_size)
        running.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        lr = self.schedule.lr_for_step(epoch, 0, steps)
        resume, self._resume_progress = self._resume_progress, None
        if resume is not None:  # continue a checkpointed epoch at its next step; skipped samples are not loaded
            resumed_loss, running.images, running.steps_done = resume.share_of(ctx.rank, ctx.world_size)
            running.loss_sum += resumed_loss
            running.step, running.samples = resume.step, resume.samples
        if cfg.global_batch_size is not None:  # the step's data and result do not depend on the world size
            return train_global_epoch(self, epoch, record, running, lambda: _autocast(cfg, self.device))
        if resume is not None:
            batches = self.data.train_batches(epoch, EpochPosition(resume.step, resume.samples, resume.world_size))
        else:
            batches = self.data.train_batches(epoch)
        step = running.step
        # No enumerate(): its reused result tuple would keep the last batch alive during the next fetch.
        for images, targets in batches:
            n_images = images.shape[0]
            loss, lr, taken = self.train_step(images, targets, epoch, step, record)
            # Nothing may hold the batch while the next one is fetched (Ray Data hands it over on the device).
            del images, targets
            if taken:
                running.loss_sum += loss
                running.images += n_images
                running.steps_done += 1
                self.state.global_step += 1
            # every rank's batches but the epoch's last are full: the sample order advances by B per rank
            running.step, running.samples = step + 1, running.samples + cfg.batch_size * ctx.world_size
            self._step_end(epoch, step, steps, loss)
            del loss
            step += 1
        totals = ctx.all_reduce_sum(torch.stack([running.loss_sum, torch.tensor(
            float(running.steps_done), device=self.device, dtype=torch.float64)]))
        self.running = None
        return float(totals[0] / max(float(totals[1]), 1.0)), running.images * ctx.world_size, lr

    def _is_scaler_overflow(self, loss: torch.Tensor) -> bool:
        """A non-finite gradient that fp16 loss scaling caused and the scaler handles (it skips the step and
        halves the scale): the loss is finite and the scale of this step was above 1.  At a scale of 1 or less
        the gradients overflow without any amplification, and a non-finite loss is the model's own failure.
        Host syncs here happen only on a non-finite step."""
        if self.scaler is None or self.scaler.get_scale() <= 1.0:
            return False
        # every rank's loss counts: ranks must agree (their gradient norm is the same, their losses are not)
        bad = (~torch.isfinite(loss.detach()).all()).to(device=self.device, dtype=torch.float64)
        return float(self.ctx.all_reduce_sum(bad.reshape(1))[0]) == 0.0

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int,
                   record: bool = False) -> tuple[torch.Tensor, float, bool]:
        """One training step of this rank, as :meth:`fit` runs it: LR, forward, backward, non-finite check,
        clipping (only when configured), optimizer step, EMA.  Returns the detached loss, the LR and whether
        the step was taken (False: skipped by ``on_nonfinite: skip``)."""
        cfg = self.cfg
        lr = self.schedule.apply_step(self.optimizer, epoch, step, self.data.steps_per_epoch)
        lr_factor = self._lr_factor()
        if lr_factor != 1.0:
            lr *= lr_factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        images, targets = self._to_device(images), targets.to(self.device, non_blocking=True)
        with _autocast(cfg, self.device):
            loss = F.cross_entropy(self.wrapped(images), targets, label_smoothing=cfg.smoothing)
        del images, targets
        loss = self.callbacks.transform_loss(self, epoch, step, loss)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        loss = loss.detach()
        return loss, lr, self.apply_gradients(epoch, step, loss, record)

    def apply_gradients(self, epoch: int, step: int, loss: torch.Tensor, record: bool) -> bool:
        """After backward (and unscaling): the non-finite rule and clipping, then DyRep's metric, the optimizer
        step and EMA; or, for a step the rule skips, the skip.  Returns whether the step was taken.  Shared by
        the per-rank step and the global-batch epoch."""
        if not self._gradients_ok(epoch, step, loss):
            self.state.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False
        if record and self.dyrep is not None:
            self.dyrep.record_metrics()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def _gradients_ok(self, epoch: int, step: int, loss: torch.Tensor) -> bool:
        """Clip when configured; with ``on_nonfinite`` on, whether the global gradient norm is finite.

        DDP has averaged gradients, so every rank sees the same norm and takes the same decision.  The check is
        the loop's one host sync per step; ``on_nonfinite: ignore`` removes it.  Without clipping the norm is
        only computed (no clip_grad_norm_, whose scaling by 1.0 rewrites every gradient)."""
        cfg = self.cfg
        if cfg.clip_grad is None and cfg.on_nonfinite == "ignore":
            return True
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if cfg.on_nonfinite == "ignore" or bool(torch.isfinite(grad_norm)):
            return True
        if cfg.on_nonfinite == "stop" and not self._is_scaler_overflow(loss):
            raise NonFiniteLossError(f"non-finite loss/gradient at epoch {epoch + 1} step {step}; "
                                     "lower the lr or set on_nonfinite=skip")
        return False

    def _adjust(self, epoch: int) -> list[dict]:
        """All ranks: reduce metrics once, rank 0's plan broadcast, apply, re-wrap DDP, optimizer surgery, EMA."""
        dyrep = self.dyrep
        assert dyrep is not None, "adjust epochs exist only with dyrep on"

        def unwrap() -> None:  # drop the old DDP (and its autograd hooks) before the structure changes
            self.wrapped = self.model

        def rewrap() -> None:  # DDP broadcasts rank 0's weights and buffers
            self.wrapped = self._wrap(f"after adjust {dyrep.adjust_count} (structure change)")

        hooks = AdjustHooks(broadcast=self.ctx.broadcast_object, place=self._place_model, unwrap=unwrap,
                            rewrap=rewrap)
        # one recalibration salt for the model and its EMA copy: the adjust's index, before apply counts it
        adjustment = adjust_structure(dyrep, self.optimizer, self._recal_fn(dyrep.adjust_count), hooks,
                                      ema=self.ema.module if self.ema is not None else None)
        plan, events = adjustment.plan, adjustment.events
        for note in plan.notes:
            logger.warning("DyRep: %s", note)
        if events and self.ctx.is_main:
            logger.info("after adjust: %d params, %.1f MMACs (plain model: %d params, %.1f MMACs)",
                        count_params(self.model), count_macs(self.model, (3, self.cfg.image_size,
                                                                          self.cfg.image_size)) / 1e6,
                        self.plain_params, self.plain_macs / 1e6)
        return events

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top1, top5, n
        for images, targets in self.data.val_batches():
            images, targets = self._to_device(images), targets.to(self.device)
            with _autocast(self.cfg, self.device):
                logits = model(images)
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, targets, reduction="sum")
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = topk.eq(targets[:, None])
            sums[1] += hit[:, :1].sum()
            sums[2] += hit.sum()
            sums[3] += targets.numel()
        sums = self.ctx.all_reduce_sum(sums)
        model.train(was_training)
        n = max(float(sums[3]), 1.0)
        return {"val_loss": float(sums[0]) / n, "val_top1": 100.0 * float(sums[1]) / n,
                "val_top5": 100.0 * float(sums[2]) / n}

    # ------------------------------------------------------------------ files
    def _write_run_files(self) -> None:
        """metrics.jsonl is rewritten from history, so a resumed run never duplicates epochs."""
        storage = self.ctx.storage
        storage.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.state.history))
        storage.write_text(STRUCTURE_FILE, json.dumps(structure_graph(self.model), indent=1))
        storage.write_text(CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True))

    def summary(self) -> dict:
        return summarize(self.state.history, self.plain_params)


def model_digest(model: nn.Module) -> str:
    """sha256 over the structure graph and every state tensor's bytes."""
    h = hashlib.sha256(json.dumps(structure_graph(model), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, ctx: TrainContext, data: DataSource | DataFactory | None = None,
          callbacks: Iterable[TrainerCallback] = ()) -> dict:
    """Run (or resume) training described by ``cfg`` in ``ctx``; returns the summary dict."""
    return Trainer.from_config(cfg, ctx, data=data, callbacks=callbacks).fit()
