"""The DyRep controller: metric accumulation, plan (grow/cut), apply.

Split so that a distributed trainer can decide once and apply everywhere:

* :meth:`DyRep.record_metrics` every step (device tensors only, no sync);
* :meth:`DyRep.plan` at an adjust point (one all-reduce when a process group
  exists) returns a small :class:`~dyrep_ray.rep.plan.Plan` (``to_json()`` for the wire);
* :func:`~dyrep_ray.rep.grow_cut.apply_plan` applies a plan to any copy of the model; the same plan on
  two identical models gives bit-identical models (seeded init).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .block_base import RepBlock
from .blocks import BN_BLOCK, check_block_type
from .cut_rule import MIN_ABSORB_GAMMA, cut_decision
from .geometry import CUT_MODES, CUT_ORDERS, DEFAULT_INIT_GAMMA, GROW_OPTIM_STATES, KXK
from .graph import restore_graph, structure_graph
from .grow_cut import RecalFn, apply_plan
from .optim import restart_state, update_optimizer
from .paths import eligible_convs, get_submodule, iter_blocks
from .plan import CutOp, Event, GrowEvent, GrowOp, Plan

logger = logging.getLogger(__name__)

METRICS = ("synflow", "snip", "grad_norm", "random")


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
    * ``cut_order`` ("original"): blocks are judged and cut in ``named_modules()`` order, outermost first, each
      after the cuts before it (a block nested in the kxk branch of a block cut with "reset" is judged on its
      re-initialised gates; one inside a removed branch is gone); "inner_first": every block judged on the
      model before any cut, innermost cut first.
    * ``grow_optim_state`` ("restart"): a grown conv's block starts with fresh optimizer state, as the
      original's new block does (the conv's bias, which the original moves into the block, keeps its state);
      "carry": the kxk conv keeps the conv's state (momentum).

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
        cut_order: str = CUT_ORDERS[0],
        grow_optim_state: str = GROW_OPTIM_STATES[0],
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown DyRep metric {metric!r}; choose one of {list(METRICS)}")
        if grow_topk < 0 or max_depth < 1 or init_gamma <= 0:
            raise ValueError("grow_topk must be >= 0, max_depth >= 1 and init_gamma > 0")
        if cut_mode not in CUT_MODES:
            raise ValueError(f"unknown cut_mode {cut_mode!r}; choose one of {list(CUT_MODES)}")
        if cut_order not in CUT_ORDERS or grow_optim_state not in GROW_OPTIM_STATES:
            raise ValueError(f"cut_order must be one of {list(CUT_ORDERS)} and grow_optim_state one of "
                             f"{list(GROW_OPTIM_STATES)}")
        self.cut_order = CUT_ORDERS[CUT_ORDERS.index(cut_order)]
        self.grow_optim_state = GROW_OPTIM_STATES[GROW_OPTIM_STATES.index(grow_optim_state)]
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
        # Created on the weights' device now; record_metrics moves them to the gradients' device and dtype
        # (a Lightning module is moved to its device after the callback's setup built this controller).
        self._sums = {name: torch.zeros((), device=conv.weight.device, dtype=torch.float32)
                      for name, conv in self._eligible}
        self._steps = 0
        self._nonfinite = torch.zeros((), dtype=torch.float64)  # recorded steps whose metric was not finite

    @property
    def eligible_names(self) -> list[str]:
        return [n for n, _ in self._eligible]

    @torch.no_grad()
    def record_metrics(self, grad_scale: Tensor | float | None = None) -> None:
        """Accumulate the metric of every eligible conv (call after backward, before step).

        Pure device work: no ``.item()``, no collective.  ``grad_scale`` is the AMP
        loss scale when gradients are still scaled (pass ``None`` after ``unscale_``).
        The products are formed in float32 or wider (bf16/fp16 gradients or weights would round the
        eps-scale synflow/snip sums); the sums follow the gradients' device and (at least float32) dtype.
        A step whose metric is not finite for some conv (an fp16 overflow step the scaler skips) adds nothing
        to any sum and is counted apart, on the device (a ``torch.where``, no host sync); if no recorded step
        of the interval was finite, :meth:`plan` refuses to grow.
        """
        self._steps += 1
        if self.metric == "random":
            return
        inv = None if grad_scale is None else 1.0 / grad_scale
        names, values = [], []
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
            names.append(name)
            values.append(value)
        if not values:
            return
        dtype = values[0].dtype
        for value in values[1:]:
            dtype = torch.promote_types(dtype, value.dtype)
        stacked = torch.stack([v.to(dtype) for v in values])
        finite = torch.isfinite(stacked).all()
        stacked = torch.where(finite, stacked, torch.zeros_like(stacked))
        for name, value in zip(names, stacked):
            total = self._sums[name]
            if total.device != value.device or total.dtype != value.dtype:
                total = self._sums[name] = total.to(device=value.device, dtype=value.dtype)
            total.add_(value)
        if self._nonfinite.device != finite.device:
            self._nonfinite = self._nonfinite.to(finite.device)
        self._nonfinite.add_((~finite).to(torch.float64))

    def metric_scores(self) -> dict[str, float]:
        """Interval-averaged metric per eligible conv over the finite recorded steps, reduced across ranks (one
        collective); NaN for every conv when steps were recorded but none was finite."""
        names = self.eligible_names
        if not names:
            return {}
        if self.metric == "random":
            gen = torch.Generator().manual_seed(self._decision_seed("random"))
            values = torch.rand(len(names), generator=gen, dtype=torch.float64)
            return dict(zip(names, values.tolist()))
        sums = torch.stack([self._sums[n].to(torch.float64) for n in names])
        counts = torch.stack([torch.tensor(float(self._steps), dtype=torch.float64),
                              self._nonfinite.to(device="cpu", dtype=torch.float64)]).to(sums.device)
        packed = torch.cat([sums, counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        recorded = float(packed[-2])
        finite_steps = recorded - float(packed[-1])
        if recorded > 0 and finite_steps <= 0:
            return dict.fromkeys(names, math.nan)
        return dict(zip(names, (packed[:-2] / max(finite_steps, 1.0)).tolist()))

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
                    block_type=self.block_type, cut_order=self.cut_order)

    def _plan_cuts(self, notes: list[str]) -> list[CutOp]:
        cuts = []
        gone: list[str] = []  # prefixes of modules an earlier cut removes ("original" order)
        reinit: list[str] = []  # prefixes of kxk branches an earlier "reset" cut re-initialises
        for path, block in iter_blocks(self.model):
            if self.cut_order == "original" and any(path.startswith(p) for p in gone):
                continue
            importance = {n: float(v) for n, v in block.branch_importance().items()}
            if self.cut_order == "original" and any(path.startswith(p) for p in reinit):
                # compensate_kxk re-initialises a nested block: every non-kxk gate init_gamma, the kxk gate 1
                importance = {n: (1.0 if n == KXK else float(self.init_gamma)) for n in importance}
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
            if remaining == [KXK]:
                gone.append(path + ".")
            else:
                gone.extend(f"{path}.branches.{n}." for n in weak)
                if self.cut_mode == "reset":
                    reinit.append(f"{path}.branches.{KXK}.")
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
            if self.grow_optim_state == "restart":
                modules = dict(self.model.named_modules())
                for event in events:
                    # a block grown inside a branch that the same plan then cut is gone: nothing to restart
                    block = modules.get(event.path) if isinstance(event, GrowEvent) else None
                    if block is not None:
                        restart_state(optimizer, block, keep=(getattr(block, "bias", None),))
        self.adjust_count += 1
        self.refresh()
        for e in events:
            logger.info("DyRep %s %s -> %s", e.op, e.path, list(e.branches))
        return events

    def step(self, optimizer: Optimizer | None = None, recal_fn: RecalFn | None = None) -> list[Event]:
        """plan() + apply() in one process (no broadcast)."""
        return self.apply(self.plan(), optimizer, recal_fn)

    def grow(self, module_name: str, seed: int | None = None, recal_fn: RecalFn | None = None,
             optimizer: Optimizer | None = None) -> RepBlock:
        """Grow one named conv now (outside the plan/adjust schedule)."""
        seed = self._decision_seed(module_name) if seed is None else seed
        plan = Plan(grow=(GrowOp(path=module_name, seed=seed),), init_gamma=self.init_gamma, cut_mode=self.cut_mode,
                    block_type=self.block_type, cut_order=self.cut_order)
        self.apply(plan, optimizer, recal_fn)
        return cast(RepBlock, get_submodule(self.model, module_name))  # grown just now

    def cut(self, module_name: str, branches: Sequence[str], optimizer: Optimizer | None = None) -> nn.Module:
        """Cut named branches of one block now (with this controller's ``cut_mode``)."""
        op = CutOp(path=module_name, branches=tuple(branches), seed=self._decision_seed(f"cut:{module_name}"))
        self.apply(Plan(cut=(op,), init_gamma=self.init_gamma, cut_mode=self.cut_mode, block_type=self.block_type,
                        cut_order=self.cut_order), optimizer)
        return get_submodule(self.model, module_name)

    # ----------------------------------------------------------------- graph
    def graph(self) -> dict:
        return structure_graph(self.model)

    restore_graph = staticmethod(restore_graph)

    # ------------------------------------------------------------ (de)serial
    def state_dict(self) -> dict:
        """Accumulators and counters (tensors + ints) for checkpoints."""
        return {"adjust_count": self.adjust_count, "steps": self._steps,
                "nonfinite_steps": self._nonfinite.detach().clone(),
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
        if "nonfinite_steps" in state:  # absent in checkpoints from versions that did not count them
            self._nonfinite = torch.as_tensor(state["nonfinite_steps"], dtype=torch.float64).clone()
        for name, value in state["sums"].items():
            self._sums[name] = torch.as_tensor(value).to(device=self._sums[name].device).clone()


def clone_structure(model: nn.Module) -> nn.Module:
    """Deep copy (used for EMA copies and tests)."""
    return copy.deepcopy(model)
