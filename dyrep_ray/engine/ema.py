"""Exponential moving average of model weights that follows structure changes."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """timm ModelEmaV2-style EMA; ``module`` is a deep copy kept in eval mode."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = lerp(ema, model, 1 - decay)`` for float state, copy for the rest: one ``torch._foreach_*``
        launch per group instead of one per tensor (same numbers as a per-tensor ``lerp_``)."""
        ema_state = self.module.state_dict()
        floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        others: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, value in model.state_dict().items():
            group = floats if value.dtype.is_floating_point else others
            group[0].append(ema_state[name])
            group[1].append(value)
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1.0 - self.decay)
        if others[0]:
            torch._foreach_copy_(others[0], others[1])
