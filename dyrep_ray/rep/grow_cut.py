"""Structural changes: grow a conv into a block, cut branches, apply a plan, convert a model statically.

:func:`apply_plan` is a pure function of model + plan (used on replicas and EMA copies): the same plan on
two identical models gives bit-identical models (seeded init).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
from torch import nn

from .block_base import RepBlock
from .blocks import BN_BLOCK, block_class, is_block
from .geometry import DEFAULT_INIT_GAMMA, KXK, conv_geometry
from .paths import block_depth, eligible_convs, get_submodule, set_submodule
from .plan import CutEvent, Event, GrowEvent, Plan

RecalFn = Callable[[nn.Module, list[nn.BatchNorm2d]], object]


def grow_conv(model: nn.Module, path: str, seed: int, init_gamma: float = DEFAULT_INIT_GAMMA,
              recal_fn: RecalFn | None = None, block_type: str = BN_BLOCK) -> RepBlock:
    """Replace the conv at ``path`` by a function-preserving block of ``block_type`` ("bn": exact in eval
    mode, after recalibrating the new BNs with ``recal_fn``; "online": exact in both modes, no BNs to
    recalibrate, so ``recal_fn`` is not called)."""
    conv = cast(nn.Conv2d, get_submodule(model, path))  # conv_geometry refuses anything but a plain Conv2d
    if conv_geometry(conv) is None:
        raise ValueError(f"module '{path}' is not a growable conv ({type(conv).__name__})")
    cls = block_class(block_type)

    def place(block: RepBlock) -> None:
        set_submodule(model, path, block)
        new_bns = block.new_branch_batchnorms()
        if recal_fn is not None and new_bns:
            recal_fn(model, new_bns)

    return cls.grow_from_conv(conv, seed, init_gamma, place=place)


def cut_block(model: nn.Module, path: str, branches: Iterable[str], mode: str = "reset", seed: int = 0,
              init_gamma: float = DEFAULT_INIT_GAMMA) -> nn.Module:
    """Cut ``branches`` of the block at ``path`` (see :meth:`RepBlock.cut` for ``mode``); a block left with
    only kxk becomes a Conv2d."""
    block = get_submodule(model, path)
    if not is_block(block):
        raise ValueError(f"module '{path}' is not a DyRep block ({type(block).__name__})")
    block.cut(branches, mode=mode, seed=seed, init_gamma=init_gamma)
    if block.branch_names == [KXK]:
        conv = block.to_conv()
        conv.train(block.training)
        set_submodule(model, path, conv)
        return conv
    return block


def apply_plan(model: nn.Module, plan: Plan | dict, recal_fn: RecalFn | None = None) -> list[Event]:
    """Apply the grows, then the cuts of ``plan`` (a :class:`Plan` or its JSON dict) to ``model``
    (the original's order); the cuts outermost first (``plan.cut_order`` "original") or innermost first
    ("inner_first"); returns the events."""
    plan = Plan.coerce(plan)
    events: list[Event] = []
    for grow in plan.grow:
        block = grow_conv(model, grow.path, grow.seed, plan.init_gamma, recal_fn, plan.block_type)
        events.append(GrowEvent(path=grow.path, branches=tuple(block.branch_names)))
    if plan.cut_order == "inner_first":  # a nested block's cut lands before its outer block may collapse
        cuts = sorted(plan.cut, key=lambda c: -c.path.count("."))
    else:  # the original: named_modules() order, outermost first; a block an earlier cut removed is skipped
        cuts = sorted(plan.cut, key=lambda c: c.path.count("."))
    for cut in cuts:
        if plan.cut_order != "inner_first" and not _is_block_at(model, cut.path):
            continue
        result = cut_block(model, cut.path, cut.branches, plan.cut_mode, cut.effective_seed, plan.init_gamma)
        still_block = is_block(result)
        events.append(CutEvent(path=cut.path, branches=tuple(cut.branches), collapsed=not still_block,
                               remaining=tuple(cast(RepBlock, result).branch_names) if still_block else ()))
    return events


def _is_block_at(model: nn.Module, path: str) -> bool:
    try:
        return is_block(get_submodule(model, path))
    except AttributeError:
        return False


# ---------------------------------------------------------------------------
# Static DBB (the original's --dbb baseline): every eligible conv a block from the start
# ---------------------------------------------------------------------------
def init_dbb_branches(block: RepBlock, generator: torch.Generator) -> None:
    """:meth:`RepBlock.init_dbb_branches` (standard DBB init: every branch at full weight)."""
    block.init_dbb_branches(generator)


def convert_to_dbb(model: nn.Module, seed: int = 0, init_gamma: float | None = None, max_depth: int = 1,
                   exclude: Sequence[str] = (), block_type: str = BN_BLOCK) -> list[str]:
    """Turn every eligible conv of ``model`` into a block, in place (the static DBB baseline).

    ``init_gamma=None`` (default): the standard DBB init of :func:`init_dbb_branches`, as the
    original's ``--dbb`` builds its blocks; the block's function at init is *not* the conv's
    (every branch starts at full weight), which is what the paper's DBB rows train.  A float
    instead uses DyRep's function-preserving grow (last BN gamma = ``init_gamma``, kxk
    compensated).  ``max_depth`` > 1 also converts the convs inside the new blocks, one nesting
    level per pass.  ``block_type`` "online" builds online blocks instead (every branch scale 1 under
    the standard init).  Returns the converted paths, outermost first.  The result's structure graph
    (:func:`structure_graph`) restores and deploys like a DyRep model's.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    converted: list[str] = []
    for depth in range(max_depth):
        targets = [n for n, _ in eligible_convs(model, max_depth, exclude, block_type)
                   if block_depth(model, n) == depth]
        for path in targets:
            block_seed = zlib.crc32(f"{seed}:dbb:{path}".encode())
            if init_gamma is not None:
                grow_conv(model, path, block_seed, init_gamma, block_type=block_type)
            else:
                conv = cast(nn.Conv2d, get_submodule(model, path))  # an eligible conv
                block = block_class(block_type).from_conv(conv)
                block.train(conv.training)
                block.init_dbb_branches(torch.Generator().manual_seed(block_seed))
                set_submodule(model, path, block)
            converted.append(path)
    return converted
