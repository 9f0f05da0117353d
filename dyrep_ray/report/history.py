"""What DyRep did to a run, as pure data: the structure timeline replayed from ``metrics.jsonl`` events, the
adjust epochs and the numbers of ``summary.md`` and the sweep table (tested directly, nothing drawn)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .runs import RunData

BranchSet = tuple  # tuple[str, ...] of branch names; None in a row = a plain conv (or no longer present)


@dataclass
class Timeline:
    epochs: list[int]
    rows: dict[str, list[BranchSet | None]]  # conv path -> branch set after each epoch, first grown first
    grows: list[tuple[str, int]] = field(default_factory=list)  # (path, epoch)
    cuts: list[tuple[str, int, tuple, bool]] = field(default_factory=list)  # (path, epoch, cut branches, collapsed)


def timeline(metrics: list[dict]) -> Timeline:
    """Replay the ``events`` of every epoch record: which convs were blocks, with which branches, when.

    A cut that collapses a block back into a conv also removes the blocks nested in its kxk branch.
    """
    state: dict[str, BranchSet | None] = {}
    rows: dict[str, list] = {}
    result = Timeline([int(m["epoch"]) for m in metrics], rows)
    for column, record in enumerate(metrics):
        epoch = int(record["epoch"])
        for event in record.get("events") or []:
            path, op = event.get("path"), event.get("op")
            if not isinstance(path, str):
                continue
            rows.setdefault(path, [None] * column)
            if op == "grow":
                state[path] = tuple(event.get("branches") or ())
                result.grows.append((path, epoch))
            elif op == "cut":
                cut = tuple(event.get("branches") or ())
                if event.get("collapsed"):
                    for p in state:
                        if p == path or p.startswith(path + "."):
                            state[p] = None
                elif event.get("remaining"):
                    state[path] = tuple(event["remaining"])
                else:
                    state[path] = tuple(b for b in (state.get(path) or ()) if b not in cut)
                result.cuts.append((path, epoch, cut, bool(event.get("collapsed"))))
        for p in rows:
            rows[p].append(state.get(p))
    return result


def timeline_rows(metrics: list[dict]) -> dict[str, list[BranchSet | None]]:
    """conv path -> branch set held after each epoch (None = plain conv) for every conv ever grown."""
    return timeline(metrics).rows


def adjust_epochs(metrics: list[dict], config: dict | None = None) -> list[int]:
    """Epochs after which DyRep adjusted the structure: the loop's schedule from ``config`` (when known)
    plus every epoch that recorded an event; limited to the epochs in ``metrics``."""
    seen = [int(m["epoch"]) for m in metrics]
    epochs = {int(m["epoch"]) for m in metrics if m.get("events")}
    if isinstance(config, dict) and config.get("dyrep", True):
        try:
            interval = int(config.get("dyrep_adjust_interval", 1))
            max_adjust = int(config.get("dyrep_max_adjust_epochs", 10 ** 9))
            total = int(config.get("epochs", max(seen, default=0) + 1))
            epochs |= {e for e in seen if interval > 0 and e % interval == 0 and e <= max_adjust and e < total}
        except (TypeError, ValueError):
            pass
    return sorted(e for e in epochs if e in set(seen))


def finite(values) -> list[float]:
    """The finite numbers among ``values``."""
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


#: Structure-graph entry types of DyRep blocks (bn block, online block): rep.blocks.GRAPH_ENTRY_TYPES, kept here
#: because report stays torch-free (a test keeps them equal).
GRAPH_BLOCK_TYPES = ("dbb", "online")


def run_summary(run: RunData) -> dict:
    """Numbers for summary.md and the sweep table."""
    m = run.metrics
    tl = timeline(m)
    tops = [(x.get("val_top1"), int(x["epoch"])) for x in m if finite([x.get("val_top1")])]
    best = max(tops, default=(None, None))
    params = finite(x.get("params") for x in m)
    final_structure = {}
    if run.structure and isinstance(run.structure.get("blocks"), list):
        final_structure = {b.get("path"): b.get("branches") for b in run.structure["blocks"]
                           if isinstance(b, dict) and b.get("type") in GRAPH_BLOCK_TYPES}
    replayed = {p for p, states in tl.rows.items() if states and states[-1] is not None}
    return {
        "name": run.name, "epochs": len(m),
        "model": (run.config or {}).get("model"), "dataset": (run.config or {}).get("dataset"),
        "best_top1": best[0], "best_epoch": best[1],
        "final_top1": m[-1].get("val_top1") if m else None,
        "grows": len(tl.grows), "cuts": len(tl.cuts),
        "plain_params": run.plain_params,
        "max_train_params": int(max(params)) if params else None,
        "final_train_params": int(params[-1]) if params else None,
        "final_blocks": final_structure,
        "unexplained_blocks": sorted(set(final_structure) - replayed),  # e.g. inherited from a PBT donor
    }
