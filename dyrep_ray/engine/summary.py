"""A run's summary: the figures a finished (or resumed) run reports, from its per-epoch history."""

from __future__ import annotations


def summarize(history: list[dict], plain_params: int | None) -> dict:
    if not history:
        return {}
    events = [e for m in history for e in m.get("events", [])]
    return {
        "epochs": len(history),
        "best_top1": max(m["val_top1"] for m in history),
        "final_top1": history[-1]["val_top1"],
        "grows": sum(e["op"] == "grow" for e in events),
        "cuts": sum(e["op"] == "cut" for e in events),
        "max_train_params": max(m["params"] for m in history),
        "final_train_params": history[-1]["params"],
        "deployed_params": plain_params,
    }


def summary_line(summary: dict) -> str:
    if not summary:
        return "no epochs completed"
    return (f"best top-1 {summary['best_top1']:.2f}%, final top-1 {summary['final_top1']:.2f}% after "
            f"{summary['epochs']} epochs; {summary['grows']} grows, {summary['cuts']} cuts; params during training "
            f"{summary['final_train_params']:,} (max {summary['max_train_params']:,}) vs deployed "
            f"{_count(summary['deployed_params'])}")


def _count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"
