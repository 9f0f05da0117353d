"""Model registry: build a model by name, list names, fail with a one-line helpful error.

Built-in models register themselves with :func:`register_model`. Names of the form ``timm/<name>`` build any
timm model with ``pretrained=False`` (no weights are ever downloaded).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import UserError

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
CIFAR_INPUT_SIZE = 32
IMAGENET_INPUT_SIZE = 224
_MAX_NAMES_IN_ERROR = 20

ModelFn = Callable[..., nn.Module]


class UnknownModelError(UserError, ValueError):
    """Raised for a model name that is not registered (or not a timm model); the message is one line."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its builder and the input resolution it is designed for."""

    name: str
    fn: ModelFn
    input_size: int


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None, *, input_size: int = IMAGENET_INPUT_SIZE
) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes, **kwargs) -> nn.Module`` under ``name`` (default: its __name__).

    ``input_size`` is the side length the model is designed for (32 for CIFAR models, 224 for ImageNet ones).
    """

    def decorator(fn: ModelFn) -> ModelFn:
        key = name or fn.__name__
        if key.startswith(TIMM_PREFIX):
            raise ValueError(f"model name {key!r} may not start with the reserved prefix {TIMM_PREFIX!r}")
        if key in _REGISTRY and _REGISTRY[key].fn is not fn:
            raise ValueError(f"model name {key!r} is already registered by {_REGISTRY[key].fn.__module__}")
        _REGISTRY[key] = ModelEntry(name=key, fn=fn, input_size=input_size)
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of the built-in models (any ``timm/<name>`` is accepted in addition)."""
    return sorted(_REGISTRY)


def _unknown_message(kind: str, bad: str, valid: list[str], hint: str) -> str:
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.0)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    shown = valid if len(valid) <= _MAX_NAMES_IN_ERROR else valid[:_MAX_NAMES_IN_ERROR] + ["..."]
    return f"unknown {kind} {bad!r}; {suggestion}valid names: {', '.join(shown)}{hint}"


def _timm_model_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _check_timm_name(timm_name: str) -> None:
    """Raise a one-line :class:`UnknownModelError` unless timm knows ``timm_name``."""
    import timm

    if not timm_name or not timm.is_model(timm_name):
        names = _timm_model_names()
        close = difflib.get_close_matches(timm_name, names, n=1, cutoff=0.0)
        suggestion = f"did you mean {TIMM_PREFIX}{close[0]}? " if close else ""
        raise UnknownModelError(
            f"unknown timm model {timm_name!r}; {suggestion}"
            f"list valid names with timm.list_models() ({len(names)} available)"
        )


def _build_timm(timm_name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    _check_timm_name(timm_name)
    logger.info("building timm model %s (pretrained=False, num_classes=%d)", timm_name, num_classes)
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` (or ``timm/<name>``) with a ``num_classes``-way classifier.

    Extra keyword arguments go to the model's builder. Raises :class:`UnknownModelError` for an unknown name.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX):], num_classes, **kwargs)
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownModelError(
            _unknown_message("model", name, list_models(), f" (or {TIMM_PREFIX}<any timm model>)")
        )
    logger.debug("building model %s (num_classes=%d, kwargs=%s)", name, num_classes, kwargs)
    return entry.fn(num_classes=num_classes, **kwargs)


def default_input_size(name: str) -> int:
    """Side length of the input the named model is designed for (CIFAR models 32, ImageNet models 224).

    For ``timm/<name>`` this is the resolution of timm's default pretrained config (224 if it has none).
    """
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_name = name[len(TIMM_PREFIX):]
        _check_timm_name(timm_name)
        cfg = timm.get_pretrained_cfg(timm_name)
        if cfg is not None and getattr(cfg, "input_size", None):
            return int(cfg.input_size[-1])
        return IMAGENET_INPUT_SIZE
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownModelError(
            _unknown_message("model", name, list_models(), f" (or {TIMM_PREFIX}<any timm model>)")
        )
    return entry.input_size
