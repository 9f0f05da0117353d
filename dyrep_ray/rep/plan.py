"""Typed DyRep plans and structure events (frozen dataclasses, JSON round trip).

A :class:`Plan` is what rank 0 decides at an adjust point and every rank applies;
:class:`GrowEvent` / :class:`CutEvent` are what applying it did.  ``to_json()`` gives
the same dicts dyrep-ray wrote before these types existed (plans on the wire, events
in ``metrics.jsonl``), and ``from_json()`` reads those dicts back, old ones included.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .blocks import BLOCK_TYPE_NAMES, BN_BLOCK
from .geometry import CUT_MODES, CUT_ORDERS, DEFAULT_INIT_GAMMA

PLAN_VERSION = 1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def default_cut_seed(path: str) -> int:
    """Seed of a cut's re-initialisation when a plan names none (plans written before cuts had seeds)."""
    return zlib.crc32(f"cut:{path}".encode())


@dataclass(frozen=True)
class GrowOp:
    """Grow the conv at ``path`` into a block; ``seed`` draws its new branches."""

    path: str
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "seed": self.seed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GrowOp:
        _require(isinstance(data, Mapping) and isinstance(data.get("path"), str) and "seed" in data,
                 f"dyrep plan grow entry needs 'path' and 'seed': {data!r}")
        return cls(path=data["path"], seed=int(data["seed"]))


@dataclass(frozen=True)
class CutOp:
    """Cut ``branches`` of the block at ``path``.

    ``collapses``/``importance`` are informational (what the planner saw); ``seed`` draws the
    re-initialisation of a nested block in the kxk slot under ``cut_mode="reset"``.
    """

    path: str
    branches: tuple[str, ...]
    collapses: bool = False
    importance: Mapping[str, float] | None = None
    seed: int | None = None

    @property
    def effective_seed(self) -> int:
        return default_cut_seed(self.path) if self.seed is None else self.seed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "branches": list(self.branches), "collapses": self.collapses}
        if self.importance is not None:
            out["importance"] = dict(self.importance)
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CutOp:
        _require(isinstance(data, Mapping) and isinstance(data.get("path"), str)
                 and isinstance(data.get("branches"), (list, tuple)),
                 f"dyrep plan cut entry needs 'path' and a 'branches' list: {data!r}")
        importance = data.get("importance")
        return cls(path=data["path"], branches=tuple(data["branches"]), collapses=bool(data.get("collapses", False)),
                   importance=None if importance is None else {str(k): float(v) for k, v in importance.items()},
                   seed=None if data.get("seed") is None else int(data["seed"]))


@dataclass(frozen=True)
class Plan:
    """One adjust point's decisions: grows first, then cuts (the original DyRep's order).

    ``block_type`` ("bn" or "online") is the type of the blocks its grows build, so every replica (and the
    EMA copy) builds the same ones; plans written before online blocks existed read as "bn".
    """

    grow: tuple[GrowOp, ...] = ()
    cut: tuple[CutOp, ...] = ()
    notes: tuple[str, ...] = ()
    init_gamma: float = DEFAULT_INIT_GAMMA
    cut_mode: str = "reset"
    adjust_index: int | None = None
    scores: Mapping[str, float] = field(default_factory=dict)
    version: int = PLAN_VERSION
    block_type: str = BN_BLOCK
    cut_order: str = CUT_ORDERS[0]

    def __post_init__(self) -> None:
        _require(self.cut_mode in CUT_MODES, f"unknown cut_mode {self.cut_mode!r}; choose one of {list(CUT_MODES)}")
        _require(self.cut_order in CUT_ORDERS,
                 f"unknown cut_order {self.cut_order!r}; choose one of {list(CUT_ORDERS)}")
        object.__setattr__(self, "cut_order", CUT_ORDERS[CUT_ORDERS.index(self.cut_order)])
        _require(self.block_type in BLOCK_TYPE_NAMES,
                 f"unknown block_type {self.block_type!r}; choose one of {list(BLOCK_TYPE_NAMES)}")
        # A plain str (a config StrEnum would pickle as the engine's class, which rep/ must not need).
        object.__setattr__(self, "block_type", BLOCK_TYPE_NAMES[BLOCK_TYPE_NAMES.index(self.block_type)])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "grow": [g.to_json() for g in self.grow],
                               "cut": [c.to_json() for c in self.cut], "notes": list(self.notes),
                               "init_gamma": self.init_gamma, "cut_mode": self.cut_mode,
                               "block_type": self.block_type, "cut_order": self.cut_order,
                               "scores": dict(self.scores)}
        if self.adjust_index is not None:
            out["adjust_index"] = self.adjust_index
        return out

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        _require(isinstance(data, Mapping) and data.get("version") == PLAN_VERSION,
                 f"not a dyrep plan (expected a dict with version {PLAN_VERSION})")
        for key in ("grow", "cut"):
            _require(isinstance(data.get(key), list), f"dyrep plan is missing its '{key}' list")
        adjust_index = data.get("adjust_index")
        return cls(grow=tuple(GrowOp.from_json(g) for g in data["grow"]),
                   cut=tuple(CutOp.from_json(c) for c in data["cut"]),
                   notes=tuple(str(n) for n in data.get("notes", [])),
                   init_gamma=float(data.get("init_gamma", DEFAULT_INIT_GAMMA)),
                   cut_mode=str(data.get("cut_mode", "reset")),
                   block_type=str(data.get("block_type", BN_BLOCK)),
                   # a plan without the key was made (and applied) by a version that cut innermost first
                   cut_order=str(data.get("cut_order", "inner_first")),
                   adjust_index=None if adjust_index is None else int(adjust_index),
                   scores={str(k): float(v) for k, v in data.get("scores", {}).items()})

    @classmethod
    def coerce(cls, plan: Plan | Mapping[str, Any]) -> Plan:
        """A :class:`Plan` from a Plan or its JSON dict (as another rank or an old caller sends it)."""
        return plan if isinstance(plan, Plan) else cls.from_json(plan)


@dataclass(frozen=True)
class GrowEvent:
    """A conv at ``path`` grew into a block with ``branches``."""

    path: str
    branches: tuple[str, ...]
    op: str = field(default="grow", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "branches": list(self.branches)}


@dataclass(frozen=True)
class CutEvent:
    """``branches`` were cut from the block at ``path``; ``collapsed``: it became a plain conv."""

    path: str
    branches: tuple[str, ...]
    collapsed: bool
    remaining: tuple[str, ...]
    op: str = field(default="cut", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "branches": list(self.branches), "collapsed": self.collapsed,
                "remaining": list(self.remaining)}


Event = GrowEvent | CutEvent


def event_from_json(data: Mapping[str, Any]) -> Event:
    """Read an event dict (``metrics.jsonl``'s ``events`` entries, any dyrep-ray version)."""
    op = data.get("op") if isinstance(data, Mapping) else None
    if op == "grow":
        return GrowEvent(path=data["path"], branches=tuple(data.get("branches", ())))
    if op == "cut":
        return CutEvent(path=data["path"], branches=tuple(data.get("branches", ())),
                        collapsed=bool(data.get("collapsed", False)), remaining=tuple(data.get("remaining", ())))
    raise ValueError(f"not a dyrep event (expected op 'grow' or 'cut'): {data!r}")
