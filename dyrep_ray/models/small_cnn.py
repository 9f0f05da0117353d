"""``small_cnn``: the built-in demo model, a plain conv3x3-BN-ReLU stack that trains in seconds on a CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import CIFAR_INPUT_SIZE, register_model
from .regularization import check_drop_rates

SMALL_CNN_WIDTHS = (16, 32, 32, 64, 64)
SMALL_CNN_POOL_AFTER = (1, 3)  # indices (0-based) of the conv layers followed by a 2x2 max-pool
_POOL_KERNEL = 2


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """A plain 3x3 conv (no bias) + BN + ReLU: the unit DyRep may grow into a Diverse Branch Block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU layers with max-pools, global average pool and a linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = SMALL_CNN_WIDTHS,
        pool_after: Sequence[int] = SMALL_CNN_POOL_AFTER,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_drop_rates("small_cnn", drop_rate, drop_path_rate)
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            layers.append(conv_bn_relu(channels, width))
            if index in pool_after:
                layers.append(nn.MaxPool2d(_POOL_KERNEL))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(F.dropout(x, self.drop_rate, self.training))


@register_model(input_size=CIFAR_INPUT_SIZE)
def small_cnn(num_classes: int = 10, **kwargs) -> SmallCNN:
    """The built-in demo model (widths 16,32,32,64,64; two max-pools)."""
    return SmallCNN(num_classes=num_classes, **kwargs)
