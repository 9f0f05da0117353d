"""One DyRep structure change, the same sequence in every loop that trains with DyRep.

decide (``DyRep.plan()``, every rank: it all-reduces the metric) -> broadcast rank 0's plan -> drop the DDP
wrapper -> apply (seeded init, BN recalibration, optimizer surgery) -> the same plan on an EMA copy -> place the
changed model on its device -> wrap it again (DDP cannot see new parameters; its constructor broadcasts rank 0's
weights and buffers).

What differs between the dyrep-ray trainer, the Lightning callback and a plain ``torchrun`` script is only how the
plan travels and how the model is wrapped: that is :class:`AdjustHooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ..rep import DyRep, Plan, apply_plan

RecalFn = Callable[[nn.Module, list[nn.BatchNorm2d]], object]


def _nothing() -> None:
    """A runtime without a wrapper has nothing to drop or re-wrap."""


@dataclass(frozen=True)
class AdjustHooks:
    """The runtime's part of an adjust.

    ``broadcast(plan)``: rank 0's plan on every rank.  ``unwrap()``: drop the DDP wrapper (and its gradient
    hooks) before the structure changes.  ``place()``: move the changed model back to its device (and memory
    format).  ``rewrap()``: wrap the changed model again.
    """

    broadcast: Callable[[Plan], Plan]
    place: Callable[[], None]
    unwrap: Callable[[], None] = _nothing
    rewrap: Callable[[], None] = _nothing


@dataclass(frozen=True)
class Adjustment:
    """What one adjust did: the plan every rank applied and its events as JSON dicts."""

    plan: Plan
    events: list[dict[str, Any]]


def adjust_structure(dyrep: DyRep, optimizer: Optimizer, recal: RecalFn, hooks: AdjustHooks,
                     ema: nn.Module | None = None) -> Adjustment:
    """Every rank: one structure change of ``dyrep.model`` (and of ``ema``, a copy that follows it)."""
    plan = hooks.broadcast(dyrep.plan())
    hooks.unwrap()
    events = [e.to_json() for e in dyrep.apply(plan, optimizer, recal)]
    if ema is not None:  # same plan, same seeds, same recalibration batches: the copy keeps the model's structure
        apply_plan(ema, plan, recal)
    hooks.place()
    hooks.rewrap()
    return Adjustment(plan=plan, events=events)


def broadcast_from_rank0(plan: Plan) -> Plan:
    """Rank 0's plan on every rank of the default ``torch.distributed`` process group."""
    box = [plan if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    received = box[0]
    assert received is not None, "rank 0 broadcast no plan"
    return received
