"""``vgg16_cifar``: VGG-16 with BN for 32x32 inputs, as used by DyRep / DBB / ACNet on CIFAR.

Layout (the VGG-16 CIFAR network of ACNet/DBB, ``base_model/vgg.py`` in DingXiaoH/ACNet, which DyRep's
CIFAR VGG-16 follows): 13 conv3x3(bias=False)-BN-ReLU layers with widths
64,64 | 128,128 | 256,256,256 | 512,512,512 | 512,512,512, a 2x2 max-pool (stride 2) after each group, so a
32x32 input ends at 1x1x512; then flatten -> Linear(512, 512) -> ReLU -> Linear(512, num_classes).
An ``AdaptiveAvgPool2d(1)`` before the flatten is the identity at 32x32 and lets other input sizes run.
Weights start from the original's TF-style init (:mod:`.initialization`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .initialization import init_tf_style
from .registry import CIFAR_INPUT_SIZE, register_model
from .regularization import check_drop_rates
from .small_cnn import conv_bn_relu

VGG16_GROUPS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
VGG_HIDDEN_FEATURES = 512
_POOL_KERNEL = 2


class VGGCifar(nn.Module):
    """VGG with BN for CIFAR-sized inputs and a two-layer classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        groups: Sequence[Sequence[int]] = VGG16_GROUPS,
        hidden_features: int = VGG_HIDDEN_FEATURES,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_drop_rates("vgg16_cifar", drop_rate, drop_path_rate)
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        channels = in_channels
        for group in groups:
            for width in group:
                layers.append(conv_bn_relu(channels, width))
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=_POOL_KERNEL, stride=_POOL_KERNEL))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, num_classes),
        )
        init_tf_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(F.dropout(x, self.drop_rate, self.training))


@register_model(input_size=CIFAR_INPUT_SIZE)
def vgg16_cifar(num_classes: int = 10, **kwargs) -> VGGCifar:
    """VGG-16 (BN) for CIFAR-10/100."""
    return VGGCifar(num_classes=num_classes, **kwargs)
