"""Inference export: fold a DyRep checkpoint into the plain architecture, verify, evaluate.

``dyrep-ray convert`` -> :func:`convert_checkpoint`; ``dyrep-ray eval`` -> :func:`evaluate_weights`.
"""

from __future__ import annotations

import importlib

# Lazy: the CLI imports this package to register its subcommands; torch/matplotlib load on first use.
_EXPORTS = {
    "ATOL": "convert",
    "ConversionCheckError": "convert",
    "ConversionResult": "convert",
    "RTOL": "convert",
    "TOP1_TOLERANCE": "convert",
    "compare_models": "evaluate",
    "convert_checkpoint": "convert",
    "evaluate_model": "evaluate",
    "evaluate_weights": "evaluate",
    "load_checkpoint_safely": "weights",
    "load_deployed": "weights",
    "read_sidecar": "weights",
    "rebuild_trained_model": "weights",
    "resolve_checkpoint": "weights",
    "validation_dataset": "evaluate",
    "validation_loader": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
