"""Regularization options shared by the built-in models (``drop_rate``, ``drop_path_rate``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_drop_rates(model_name: str, drop_rate: float, drop_path_rate: float) -> None:
    """Validate the rates; built-in models have no residual drop-path (use a ``timm/`` model for that)."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{model_name}: drop_rate must be in [0, 1), got {drop_rate}")
    if drop_path_rate:
        raise ValueError(f"{model_name}: drop_path_rate is not supported (got {drop_path_rate}); use a timm/ model")


class InputDropout:
    """Forward pre-hook applying dropout to a module's input in training mode (picklable, adds no params)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (F.dropout(inputs[0], self.rate, module.training), *inputs[1:])


def add_input_dropout(module: nn.Module, rate: float) -> None:
    """Apply dropout to ``module``'s input when ``rate`` > 0, without changing the state_dict layout."""
    if rate > 0:
        module.register_forward_pre_hook(InputDropout(rate))
