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
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            ema_value = ema_state[name]
            if value.dtype.is_floating_point:
                ema_value.lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema_value.copy_(value)
