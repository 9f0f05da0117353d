"""The DyRep controller: metric accumulation, plan (grow/cut), apply, structure graph.

Split so that a distributed trainer can decide once and apply everywhere:

* :meth:`DyRep.record_metrics` every step (device tensors only, no sync);
* :meth:`DyRep.plan` at an adjust point (one all-reduce when a process group
  exists) returns a small :class:`~dyrep_ray.rep.plan.Plan` (``to_json()`` for the wire);
* :func:`apply_plan` applies a plan to any copy of the model; the same plan on
  two identical models gives bit-identical models (seeded init).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .blocks import (
    BLOCK_TYPES,
    BN_BLOCK,
    GRAPH_ENTRY_TYPES,
    ONLINE_BLOCK,
    block_type_name,
    check_block_type,
    is_block,
)
from .dbb import (
    CUT_MODES,
    DEFAULT_INIT_GAMMA,
    KXK,
    ORIG_BIAS_ATTR,
    DiverseBranchBlock,
    block_from_conv,
    conv_geometry,
    init_new_branches,
    new_branch_batchnorms,
)
from .online import OnlineBlock, OnlineBranch, grow_online_block, online_block_from_conv
from .optim import update_optimizer
from .plan import CutEvent, CutOp, Event, GrowEvent, GrowOp, Plan

logger = logging.getLogger(__name__)

METRICS = ("synflow", "snip", "grad_norm", "random")
GRAPH_VERSION = 1
# Below this |kxk_scale()| (bn block: kxk BN gamma; online block: kxk scale) the kxk branch cannot absorb a
# cut branch without blowing up (cut_mode="absorb").
MIN_ABSORB_GAMMA = 1e-8

RecalFn = Callable[[nn.Module, list[nn.BatchNorm2d]], object]
Block = DiverseBranchBlock | OnlineBlock


# ---------------------------------------------------------------------------
# Module tree helpers
# ---------------------------------------------------------------------------
def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def iter_blocks(model: nn.Module) -> list[tuple[str, Block]]:
    """Every block of either type (nested ones included), outermost first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BLOCK_TYPES)]


def enclosing_blocks(model: nn.Module, path: str) -> list[Block]:
    """The blocks enclosing the module at ``path`` (the module itself excluded), outermost first."""
    parts = path.split(".") if path else []
    found = []
    for i in range(len(parts)):
        module = get_submodule(model, ".".join(parts[:i]))
        if is_block(module):
            found.append(module)
    return found


def block_depth(model: nn.Module, path: str) -> int:
    """Number of blocks enclosing the module at ``path`` (the module itself excluded)."""
    return len(enclosing_blocks(model, path))


def eligible_convs(model: nn.Module, max_depth: int = 2, exclude: Sequence[str] = (),
                   block_type: str | None = None) -> list[tuple[str, nn.Conv2d]]:
    """Plain convs DyRep may grow: square k>1 convs whose module path passes through fewer than
    ``max_depth`` blocks (the original's rule).  Inside a block (either type) that is the kxk
    branch's conv and the 1x1->kxk branch's kxk conv (``branches.1x1_kxk.conv2``, padding 0, so
    it grows the reduced branch set).  With ``block_type`` given, a conv inside a block of the
    other type is not eligible: blocks nest only in blocks of their own type (an online block's
    kernel assembly needs a nested block that is linear in train mode, a bn block is not)."""
    wanted = None if block_type is None else type_class(block_type)
    found = []
    for name, module in model.named_modules():
        if conv_geometry(module) is None or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        outer = enclosing_blocks(model, name)
        if len(outer) < max_depth and (wanted is None or all(type(b) is wanted for b in outer)):
            found.append((name, module))
    return found


def type_class(block_type: str) -> type[nn.Module]:
    """The block class of a block type name ("bn" / "online")."""
    return DiverseBranchBlock if check_block_type(block_type) == BN_BLOCK else OnlineBlock


# ---------------------------------------------------------------------------
# Structure graph
# ---------------------------------------------------------------------------
def structure_graph(model: nn.Module) -> dict:
    """JSON-serializable description of every structural change made to ``model``.

    Entries are ordered outermost first: ``{"path", "type": "dbb", geometry..., "branches"}``
    for bn blocks, ``{"path", "type": "online", geometry..., "branches", "bias"}`` for online
    blocks (:meth:`OnlineBlock.describe`) and ``{"path", "type": "conv", "bias": true,
    "orig_bias": false}`` for plain convs that gained a bias when a block collapsed back into a conv.
    """
    entries = []
    for name, module in model.named_modules():
        if is_block(module):
            entries.append({"path": name, "type": GRAPH_ENTRY_TYPES[block_type_name(module)], **module.describe()})
        elif isinstance(module, nn.Conv2d) and hasattr(module, ORIG_BIAS_ATTR):
            entries.append({"path": name, "type": "conv", "bias": module.bias is not None,
                            "orig_bias": bool(getattr(module, ORIG_BIAS_ATTR))})
    entries.sort(key=lambda e: e["path"].count(".") if e["path"] else -1)
    return {"version": GRAPH_VERSION, "blocks": entries}


def restore_graph(model: nn.Module, graph: dict) -> nn.Module:
    """Rebuild on a fresh base model the structure described by ``graph`` (in place).

    Only the structure is rebuilt; load the state_dict (``strict=True``) afterwards.
    """
    if (not isinstance(graph, dict) or graph.get("version") != GRAPH_VERSION
            or not isinstance(graph.get("blocks"), list)):
        raise ValueError(f"not a dyrep structure graph (expected version {GRAPH_VERSION} with a 'blocks' list)")
    for entry in sorted(graph["blocks"], key=lambda e: e["path"].count(".")):
        path = entry["path"]
        try:
            current = get_submodule(model, path)
        except AttributeError as exc:
            raise ValueError(f"structure graph names module '{path}', which this model does not have") from exc
        if not isinstance(current, nn.Conv2d):
            raise ValueError(f"structure graph expects a Conv2d at '{path}', found {type(current).__name__}")
        w = current.weight
        if entry["type"] == "dbb":
            block = DiverseBranchBlock(
                entry["in_channels"], entry["out_channels"], entry["kernel_size"], entry["stride"],
                entry["padding"], entry["groups"], branches=entry["branches"], orig_bias=entry["orig_bias"],
                # torch's stubs type a conv's kernel_size/stride/padding attributes as tuple[int, ...], the
                # constructor takes tuple[int, int]
                kxk_conv=nn.Conv2d(current.in_channels, current.out_channels,
                                   current.kernel_size, current.stride,  # type: ignore[arg-type]
                                   current.padding, groups=current.groups,  # type: ignore[arg-type]
                                   bias=False, device=w.device, dtype=w.dtype),
                device=w.device, dtype=w.dtype)
            if (block.in_channels, block.out_channels, block.groups) != (current.in_channels, current.out_channels,
                                                                        current.groups):
                raise ValueError(f"structure graph geometry for '{path}' does not match the model's conv")
            set_submodule(model, path, block)
        elif entry["type"] == GRAPH_ENTRY_TYPES[ONLINE_BLOCK]:
            set_submodule(model, path, OnlineBlock.from_description(entry, current))
        elif entry["type"] == "conv":
            conv = nn.Conv2d(current.in_channels, current.out_channels,
                             current.kernel_size, current.stride,  # type: ignore[arg-type]  # (as above)
                             current.padding, groups=current.groups,  # type: ignore[arg-type]
                             bias=bool(entry["bias"]), device=w.device, dtype=w.dtype)
            setattr(conv, ORIG_BIAS_ATTR, bool(entry["orig_bias"]))
            set_submodule(model, path, conv)
        else:
            raise ValueError(f"unknown structure graph entry type {entry['type']!r} at '{path}'")
    return model


# ---------------------------------------------------------------------------
# Applying a plan (pure function of model + plan: used on replicas and EMA copies)
# ---------------------------------------------------------------------------
def grow_conv(model: nn.Module, path: str, seed: int, init_gamma: float = DEFAULT_INIT_GAMMA,
              recal_fn: RecalFn | None = None, block_type: str = BN_BLOCK) -> Block:
    """Replace the conv at ``path`` by a function-preserving block of ``block_type`` ("bn": exact in eval
    mode, after recalibrating the new BNs with ``recal_fn``; "online": exact in both modes, no BNs to
    recalibrate, so ``recal_fn`` is not called)."""
    conv = cast(nn.Conv2d, get_submodule(model, path))  # conv_geometry refuses anything but a plain Conv2d
    if conv_geometry(conv) is None:
        raise ValueError(f"module '{path}' is not a growable conv ({type(conv).__name__})")
    if check_block_type(block_type) == ONLINE_BLOCK:
        online = grow_online_block(conv, seed, init_gamma)
        set_submodule(model, path, online)
        return online
    with torch.no_grad():
        target_kernel = conv.weight.detach().clone()
        target_bias = (conv.bias.detach().clone() if conv.bias is not None
                       else torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    block = block_from_conv(conv)
    block.train(conv.training)
    generator = torch.Generator().manual_seed(int(seed))
    init_new_branches(block, init_gamma, generator)
    set_submodule(model, path, block)
    if recal_fn is not None:
        recal_fn(model, new_branch_batchnorms(block))
    block.compensate_kxk(target_kernel, target_bias)
    return block


def cut_block(model: nn.Module, path: str, branches: Iterable[str], mode: str = "reset", seed: int = 0,
              init_gamma: float = DEFAULT_INIT_GAMMA) -> nn.Module:
    """Cut ``branches`` of the block at ``path`` (see :meth:`DiverseBranchBlock.cut` and
    :meth:`OnlineBlock.cut` for ``mode``); a block left with only kxk becomes a Conv2d."""
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
    (the original's order); returns the events."""
    plan = Plan.coerce(plan)
    events: list[Event] = []
    for grow in plan.grow:
        block = grow_conv(model, grow.path, grow.seed, plan.init_gamma, recal_fn, plan.block_type)
        events.append(GrowEvent(path=grow.path, branches=tuple(block.branch_names)))
    # Innermost first: a nested block's cut must land before its outer block may collapse into a conv.
    for cut in sorted(plan.cut, key=lambda c: -c.path.count(".")):
        result = cut_block(model, cut.path, cut.branches, plan.cut_mode, cut.effective_seed, plan.init_gamma)
        still_block = is_block(result)
        events.append(CutEvent(path=cut.path, branches=tuple(cut.branches), collapsed=not still_block,
                               remaining=tuple(cast(Block, result).branch_names) if still_block else ()))
    return events


# ---------------------------------------------------------------------------
# Static DBB (the original's --dbb baseline): every eligible conv a block from the start
# ---------------------------------------------------------------------------
@torch.no_grad()
def init_dbb_branches(block: Block, generator: torch.Generator) -> None:
    """Standard DBB init (Ding et al.'s block as constructed): every new conv drawn like a fresh
    ``nn.Conv2d`` (Kaiming-uniform, a=sqrt(5)), every BN gamma=1, beta=0, fresh statistics
    (an online block: every branch scale 1).

    The kxk conv keeps its weight.  Values are drawn on the CPU in float64 from ``generator``
    and cast, so every rank builds the same block.
    """
    for name, branch in block.branches.items():
        for module in branch.modules():
            if isinstance(module, nn.Conv2d) and name != KXK:
                cpu = torch.empty(module.weight.shape, dtype=torch.float64)
                nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
                module.weight.copy_(cpu.to(module.weight.dtype))
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()
        if isinstance(block, OnlineBlock):
            cast(OnlineBranch, branch).scale.fill_(1.0)


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
                from_conv = block_from_conv if check_block_type(block_type) == BN_BLOCK else online_block_from_conv
                block = from_conv(conv)
                block.train(conv.training)
                init_dbb_branches(block, torch.Generator().manual_seed(block_seed))
                set_submodule(model, path, block)
            converted.append(path)
    return converted


# ---------------------------------------------------------------------------
# The cut rule
# ---------------------------------------------------------------------------
def cut_decision(weights: dict[str, float], threshold: float, std_gate: float,
                 cut_lone_branch: bool = False) -> list[str]:
    """Branches to cut, given each present non-kxk branch's weight (mean|gamma| / kxk's).

    The original DyRep's rule: ``valid`` = the weights that are not exactly 1.0; if the
    *unbiased* std of ``valid`` exceeds ``std_gate``, cut every branch whose weight is below
    both mean(valid) and ``threshold``.  With fewer than two valid weights the std is
    undefined and nothing is cut, and with two or more the largest always survives: a block
    never collapses back to a plain conv.  ``cut_lone_branch=True`` (dyrep-ray's first
    version) also cuts a block's only remaining branch when its weight is below
    ``threshold``, collapsing the block into a conv that may grow again later.
    """
    if cut_lone_branch and len(weights) == 1:
        (name, value), = weights.items()
        return [name] if value < threshold else []
    valid = [v for v in weights.values() if v != 1.0]
    if len(valid) < 2:
        return []
    vals = torch.tensor(valid, dtype=torch.float64)
    if not float(vals.std(unbiased=True)) > std_gate:
        return []
    mean = float(vals.mean())
    return [n for n, v in weights.items() if v < mean and v < threshold]


# ---------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------
class DyRep:
    """Decides where a model grows and which branches it cuts.

    Args mirror the official DyRep defaults: ``metric`` ("synflow"), ``grow_topk`` (1),
    ``cut_threshold`` λ (0.1), ``cut_std_gate`` (0.02), ``init_gamma`` (0.01),
    ``max_depth`` (2 nesting levels).  ``model`` is the *unwrapped* module (not DDP).

    Options where dyrep-ray's first version differed from the original (defaults = original):

    * ``cut_lone_branch`` (False): also cut a block's only remaining non-kxk branch when its
      weight is below λ, collapsing the block into a conv (which may regrow later).  The
      original never collapses a block (one weight has no std).
    * ``cut_mode`` ("reset"): how a cut keeps the function -- "reset" re-derives the kxk branch
      from the fused block with a freshly reset kxk BN (the original); "absorb" folds the cut
      branch into the kxk conv and keeps the kxk BN's statistics.  (Online blocks: "reset" sets
      the kxk scale to 1 and compensates the kxk kernel; "absorb" divides by the kept kxk scale.)

    ``block_type`` ("bn"): what a grow builds -- "bn" the paper's Diverse Branch Block, "online" the
    OREPA-style :class:`~dyrep_ray.rep.online.OnlineBlock` (per-channel branch scales instead of BNs,
    one conv per step; its cut weight is each branch's mean |scale| over the kxk branch's, under the
    same λ / std-gate rule).  Recorded in every plan, so replicas and EMA copies build the same blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        metric: str = "synflow",
        grow_topk: int = 1,
        cut_threshold: float = 0.1,
        cut_std_gate: float = 0.02,
        init_gamma: float = DEFAULT_INIT_GAMMA,
        max_depth: int = 2,
        seed: int = 0,
        exclude: Sequence[str] = (),
        cut_lone_branch: bool = False,
        cut_mode: str = "reset",
        block_type: str = BN_BLOCK,
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown DyRep metric {metric!r}; choose one of {list(METRICS)}")
        if grow_topk < 0 or max_depth < 1 or init_gamma <= 0:
            raise ValueError("grow_topk must be >= 0, max_depth >= 1 and init_gamma > 0")
        if cut_mode not in CUT_MODES:
            raise ValueError(f"unknown cut_mode {cut_mode!r}; choose one of {list(CUT_MODES)}")
        self.block_type = check_block_type(block_type)
        self.cut_lone_branch = bool(cut_lone_branch)
        self.cut_mode = CUT_MODES[CUT_MODES.index(cut_mode)]  # a plain str, whatever enum the caller used
        self.model = model
        self.metric = metric
        self.grow_topk = grow_topk
        self.cut_threshold = cut_threshold
        self.cut_std_gate = cut_std_gate
        self.init_gamma = init_gamma
        self.max_depth = max_depth
        self.seed = seed
        self.exclude = tuple(exclude)
        self.adjust_count = 0
        self._sums: dict[str, Tensor] = {}
        self._steps = 0
        self._eligible: list[tuple[str, nn.Conv2d]] = []
        self.refresh()

    # --------------------------------------------------------------- metrics
    def refresh(self) -> None:
        """Re-scan eligible convs and reset accumulators (after any structure change)."""
        self._eligible = eligible_convs(self.model, self.max_depth, self.exclude, self.block_type)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        self._sums = {name: torch.zeros((), device=conv.weight.device, dtype=torch.float32)
                      for name, conv in self._eligible}
        self._steps = 0

    @property
    def eligible_names(self) -> list[str]:
        return [n for n, _ in self._eligible]

    @torch.no_grad()
    def record_metrics(self, grad_scale: Tensor | float | None = None) -> None:
        """Accumulate the metric of every eligible conv (call after backward, before step).

        Pure device work: no ``.item()``, no collective.  ``grad_scale`` is the AMP
        loss scale when gradients are still scaled (pass ``None`` after ``unscale_``).
        The products are formed in float32 (bf16/fp16 gradients or weights would round the
        eps-scale synflow/snip sums), and a step with non-finite gradients (an AMP overflow
        step the scaler skips) poisons the sum on purpose: :meth:`plan` then refuses to grow.
        """
        self._steps += 1
        if self.metric == "random":
            return
        inv = None if grad_scale is None else 1.0 / grad_scale
        for name, conv in self._eligible:
            grad = conv.weight.grad
            if grad is None:
                continue
            wide = torch.promote_types(grad.dtype, torch.float32)
            grad, weight = grad.to(wide), conv.weight.to(wide)
            if self.metric == "synflow":
                value = (grad * weight).sum()
            elif self.metric == "snip":
                value = (grad * weight).abs().sum()
            else:  # grad_norm
                value = torch.linalg.vector_norm(grad)
            if inv is not None:
                value = value * inv
            self._sums[name].add_(value.float())

    def metric_scores(self) -> dict[str, float]:
        """Interval-averaged metric per eligible conv, reduced across ranks (one collective)."""
        names = self.eligible_names
        if not names:
            return {}
        if self.metric == "random":
            gen = torch.Generator().manual_seed(self._decision_seed("random"))
            values = torch.rand(len(names), generator=gen, dtype=torch.float64)
            return dict(zip(names, values.tolist()))
        sums = torch.stack([self._sums[n] for n in names])
        steps = torch.tensor([float(self._steps)], device=sums.device)
        packed = torch.cat([sums, steps])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        total_steps = max(float(packed[-1]), 1.0)
        return dict(zip(names, (packed[:-1].double() / total_steps).tolist()))

    def _decision_seed(self, salt: str) -> int:
        return zlib.crc32(f"{self.seed}:{self.adjust_count}:{salt}".encode())

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        """Decide this adjust point's grows and cuts.

        As in the original DyRep: grow first (top-k by interval-averaged metric), then cuts
        evaluated over all blocks.  A block grown at this adjust has equal branch weights
        (all ``init_gamma``), so the std gate never cuts it at once; evaluating the existing
        blocks is therefore the same decision as evaluating them after the grows.
        """
        notes: list[str] = []
        cuts = self._plan_cuts(notes)
        collapsing = {c.path for c in cuts if c.collapses}
        scores = self.metric_scores()
        if scores and not all(math.isfinite(v) for v in scores.values()):
            bad = [n for n, v in scores.items() if not math.isfinite(v)]
            notes.append(f"no growth: non-finite metric for {bad[:5]}")
            logger.warning("DyRep: non-finite metric for %s; skipping growth at this adjust point", bad[:5])
            scores = {}
        # Growing inside a block that collapses at this adjust (cut_lone_branch only) would be undone at once.
        candidates = [(v, n) for n, v in scores.items()
                      if not any(n.startswith(c + ".") for c in collapsing)]
        candidates.sort(key=lambda t: (-t[0], t[1]))
        grows = tuple(GrowOp(path=n, seed=self._decision_seed(n)) for _, n in candidates[: self.grow_topk])
        return Plan(grow=grows, cut=tuple(cuts), notes=tuple(notes), init_gamma=self.init_gamma,
                    cut_mode=self.cut_mode, adjust_index=self.adjust_count, scores={n: v for v, n in candidates},
                    block_type=self.block_type)

    def _plan_cuts(self, notes: list[str]) -> list[CutOp]:
        cuts = []
        for path, block in iter_blocks(self.model):
            importance = {n: float(v) for n, v in block.branch_importance().items()}
            if not all(math.isfinite(v) for v in importance.values()):
                notes.append(f"no cut at {path}: non-finite branch scales")
                continue
            others = {n: v for n, v in importance.items() if n != KXK}
            weak = cut_decision(others, self.cut_threshold, self.cut_std_gate, self.cut_lone_branch)
            if not weak:
                continue
            if self.cut_mode == "absorb":
                kxk_gamma = block.kxk_scale().detach().abs()
                if float(kxk_gamma.min()) < MIN_ABSORB_GAMMA:
                    notes.append(f"no cut at {path}: kxk scale ~ 0 cannot absorb branches")
                    continue
            remaining = [n for n in block.branch_names if n not in weak]
            cuts.append(CutOp(path=path, branches=tuple(weak), collapses=remaining == [KXK], importance=importance,
                              seed=self._decision_seed(f"cut:{path}")))
        return cuts

    # ----------------------------------------------------------------- apply
    def apply(self, plan: Plan | dict, optimizer: Optimizer | None = None,
              recal_fn: RecalFn | None = None) -> list[Event]:
        """Apply ``plan`` to this controller's model, then optimizer surgery and re-scan."""
        plan = Plan.coerce(plan)
        if plan.grow and plan.block_type != self.block_type:
            raise ValueError(f"plan grows {plan.block_type!r} blocks but this controller grows {self.block_type!r} "
                             "ones (dyrep_block must be the same everywhere)")
        not_eligible = [g.path for g in plan.grow if g.path not in self.eligible_names]
        if not_eligible:
            raise ValueError(f"cannot grow {not_eligible}: not eligible (eligible: {self.eligible_names[:8]}...)")
        events = apply_plan(self.model, plan, recal_fn)
        if optimizer is not None:
            update_optimizer(optimizer, self.model)
        self.adjust_count += 1
        self.refresh()
        for e in events:
            logger.info("DyRep %s %s -> %s", e.op, e.path, list(e.branches))
        return events

    def step(self, optimizer: Optimizer | None = None, recal_fn: RecalFn | None = None) -> list[Event]:
        """plan() + apply() in one process (no broadcast)."""
        return self.apply(self.plan(), optimizer, recal_fn)

    def grow(self, module_name: str, seed: int | None = None, recal_fn: RecalFn | None = None,
             optimizer: Optimizer | None = None) -> Block:
        """Grow one named conv now (outside the plan/adjust schedule)."""
        seed = self._decision_seed(module_name) if seed is None else seed
        plan = Plan(grow=(GrowOp(path=module_name, seed=seed),), init_gamma=self.init_gamma, cut_mode=self.cut_mode,
                    block_type=self.block_type)
        self.apply(plan, optimizer, recal_fn)
        return cast(Block, get_submodule(self.model, module_name))  # grown just now

    def cut(self, module_name: str, branches: Sequence[str], optimizer: Optimizer | None = None) -> nn.Module:
        """Cut named branches of one block now (with this controller's ``cut_mode``)."""
        op = CutOp(path=module_name, branches=tuple(branches), seed=self._decision_seed(f"cut:{module_name}"))
        self.apply(Plan(cut=(op,), init_gamma=self.init_gamma, cut_mode=self.cut_mode, block_type=self.block_type),
                   optimizer)
        return get_submodule(self.model, module_name)

    # ----------------------------------------------------------------- graph
    def graph(self) -> dict:
        return structure_graph(self.model)

    restore_graph = staticmethod(restore_graph)

    # ------------------------------------------------------------ (de)serial
    def state_dict(self) -> dict:
        """Accumulators and counters (tensors + ints) for checkpoints."""
        return {"adjust_count": self.adjust_count, "steps": self._steps,
                "sums": {n: t.detach().clone() for n, t in self._sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore accumulators saved by :meth:`state_dict` on a model of the same structure.

        An accumulator for a conv that is not a growth candidate here means the checkpoint's
        structure does not match this model: refused with ``ValueError`` (nothing changed).
        Candidates the state lacks (e.g. a checkpoint from a version with a narrower candidate
        rule) start from zero, with a warning.
        """
        # the model as it is now
        eligible = {n for n, _ in eligible_convs(self.model, self.max_depth, self.exclude, self.block_type)}
        unknown = sorted(set(state["sums"]) - eligible)
        if unknown:
            raise ValueError(f"DyRep state has metric accumulators for {unknown[:5]}, which are not growth "
                             "candidates of this model: the checkpoint's structure graph does not match the model")
        missing = sorted(eligible - set(state["sums"]))
        if missing:
            logger.warning("DyRep state has no metric accumulator for %s; they restart from zero", missing[:5])
        self.adjust_count = int(state["adjust_count"])
        self.refresh()
        self._steps = int(state["steps"])
        for name, value in state["sums"].items():
            self._sums[name].copy_(value)


def clone_structure(model: nn.Module) -> nn.Module:
    """Deep copy (used for EMA copies and tests)."""
    return copy.deepcopy(model)
