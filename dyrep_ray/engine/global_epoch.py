"""A training epoch of global-batch steps (``global_batch_size``): the loop of :mod:`~dyrep_ray.engine.global_step`.

The epoch's metrics are world-size independent too: every rank adds its share of each step's mean loss, rank 0
alone counts steps, and a mid-epoch position is the step (a resume at any world size continues there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from .global_batch import rng_key
from .global_step import CanonicalBatchNorm, GradientSum, SampleRecord, forward_micro_batches


def train_global_epoch(trainer: Any, epoch: int, record: bool, running: Any,
                       autocast: Callable[[], Any]) -> tuple[float, int, float]:
    """One epoch of the loop's ``trainer`` (from ``running.step`` on; the loop passes its autocast context
    factory); returns (mean train loss, images, last lr).  The LR, clipping and non-finite rule are the loop's."""
    cfg, ctx, device = trainer.cfg, trainer.ctx, trainer.device
    data: Any = trainer.data
    steps = data.steps_per_epoch
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    bn = trainer.canonical_bn
    if bn is None:
        bn = trainer.canonical_bn = CanonicalBatchNorm()
    samples = (SampleRecord(ctx.storage, epoch, running.step, ctx.rank, ctx.world_size)
               if cfg.debug_sample_record else None)
    trainer.sample_record = samples
    lr = trainer.schedule.lr_for_step(epoch, 0, steps)

    def backward(loss: torch.Tensor) -> None:
        (trainer.scaler.scale(loss) if trainer.scaler is not None else loss).backward()

    for gstep in data.global_steps(epoch, running.step):
        step = gstep.step
        lr = trainer.schedule.apply_step(trainer.optimizer, epoch, step, steps)
        bn.begin_step(trainer.model)
        grads = GradientSum(params)
        share, images = forward_micro_batches(
            trainer.model, gstep, seed=cfg.seed, epoch=epoch, device=device, to_device=trainer._to_device,
            autocast=autocast, smoothing=cfg.smoothing, bn=bn, backward=backward, grads=grads,
            transform=functools.partial(trainer.callbacks.transform_loss, trainer, epoch, step))
        grads.reduce(ctx, had_data=bool(gstep.micros))
        bn.finish_step(math.ceil(gstep.size / data.micro), device, ctx)
        if samples is not None:
            samples.add(gstep)
        if trainer.scaler is not None:
            trainer.scaler.unscale_(trainer.optimizer)
        if trainer.apply_gradients(epoch, step, share, record):  # the loop's rule, step, metric and EMA
            running.loss_sum += share
            running.images += images
            running.steps_done += 1 if ctx.is_main else 0  # the step is one, whichever ranks computed it
            trainer.state.global_step += 1
        running.step, running.samples = step + 1, min((step + 1) * cfg.global_batch_size, data.sizes[0])
        trainer._step_end(epoch, step, steps, share)
    if samples is not None:
        samples.write()
    # What follows the epoch (recalibration's dropout, a grow's initialisation) draws from the global RNG, whose
    # state here depends on which micro-batch this rank computed last: reseed it from the epoch alone.
    torch.manual_seed(rng_key(cfg.seed, epoch, -1))
    totals = ctx.all_reduce_sum(torch.stack([running.loss_sum, torch.tensor(
        float(running.steps_done), device=device, dtype=torch.float64), torch.tensor(
        float(running.images), device=device, dtype=torch.float64)]))
    trainer.running = None
    return float(totals[0] / max(float(totals[1]), 1.0)), int(totals[2]), lr
