"""Pictures of what DyRep did to a run: structure timeline, curves, parameter count, summary.md.

``dyrep-ray report RUN_DIR`` -> :func:`render_report`.  Reads JSON only (never tensors).
"""

from __future__ import annotations

import importlib

# Lazy: the CLI imports this package to register its subcommands; torch/matplotlib load on first use.
_EXPORTS = {
    "ReportError": "figures",
    "RunData": "figures",
    "Timeline": "figures",
    "adjust_epochs": "figures",
    "find_runs": "figures",
    "load_run": "figures",
    "render_report": "figures",
    "render_run_report": "figures",
    "render_sweep_report": "figures",
    "run_summary": "figures",
    "timeline": "figures",
    "timeline_rows": "figures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
