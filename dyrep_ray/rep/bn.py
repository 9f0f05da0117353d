"""BatchNorm running-statistics recalibration.

Works in one process and under ``torch.distributed``: with a process group the
recalibrated statistics are averaged across ranks once at the end, so every
replica holds the same buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@contextmanager
def _only_these_bns_in_train_mode(model: nn.Module, bns: list[nn.modules.batchnorm._BatchNorm]):
    was_training = {m: m.training for m in model.modules()}
    saved_momentum = {bn: bn.momentum for bn in bns}
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average = exact mean over the batches seen
            bn.train()
        yield
    finally:
        for bn, momentum in saved_momentum.items():
            bn.momentum = momentum
        for m, mode in was_training.items():
            m.training = mode


def average_bn_stats_across_ranks(bns: Iterable[nn.modules.batchnorm._BatchNorm]) -> None:
    """All-reduce (mean) running_mean/var of ``bns`` in one collective, if a process group exists."""
    bns = list(bns)
    if not bns or not (dist.is_available() and dist.is_initialized()):
        return
    # BNs here track running stats (the buffers are None only with track_running_stats=False)
    flat = torch.cat([torch.cat([cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)]) for bn in bns])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for bn in bns:
        n = bn.num_features
        cast(Tensor, bn.running_mean).copy_(flat[offset:offset + n])
        cast(Tensor, bn.running_var).copy_(flat[offset + n:offset + 2 * n])
        offset += 2 * n


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor],
    bns: Iterable[nn.modules.batchnorm._BatchNorm] | None = None,
    num_iters: int = 20,
    forward: Callable[[nn.Module, Tensor], object] | None = None,
) -> int:
    """Re-estimate running stats of ``bns`` (default: every BN) from up to ``num_iters`` batches.

    The rest of the model runs in eval mode, so other BNs' statistics are untouched.
    Returns the number of batches used.  Statistics are averaged across ranks.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if bns is None else list(bns)
    if not bns:
        return 0
    run = forward if forward is not None else (lambda m, x: m(x))
    used = 0
    with _only_these_bns_in_train_mode(model, bns):
        iterator: Iterator = iter(batches)
        for _ in range(num_iters):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            run(model, batch)
            used += 1
    if used == 0:
        logger.warning("BN recalibration got no batches; running statistics left at their defaults")
    average_bn_stats_across_ranks(bns)
    return used
