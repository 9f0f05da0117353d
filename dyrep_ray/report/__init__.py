"""Pictures of what DyRep did to a run: structure timeline, curves, parameter count, summary.md.

``dyrep-ray report RUN_DIR`` -> :func:`render_report`.  Reads JSON only (never tensors).
"""

from __future__ import annotations

import importlib

# Lazy: the CLI imports this package to register its subcommands; torch/matplotlib load on first use.
_EXPORTS = {
    "ReportError": "runs",
    "RunData": "runs",
    "Timeline": "history",
    "adjust_epochs": "history",
    "find_runs": "runs",
    "load_run": "runs",
    "render_report": "render",
    "render_run_report": "render",
    "render_sweep_report": "render",
    "run_summary": "history",
    "timeline": "history",
    "timeline_rows": "history",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
