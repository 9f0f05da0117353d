"""``mobilenet_v1``: the standard 1.0x ImageNet MobileNetV1 (Howard et al., 2017), with the original DyRep's
TF-style init (:mod:`.initialization`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .initialization import init_tf_style
from .registry import IMAGENET_INPUT_SIZE, register_model
from .regularization import check_drop_rates

MOBILENET_V1_STEM_WIDTH = 32
MOBILENET_V1_STEM_STRIDE = 2
# (output channels, stride of the depthwise conv) of the 13 depthwise-separable blocks
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """Depthwise conv3x3 (groups=C) + BN + ReLU, then pointwise conv1x1 + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = _conv_bn_relu(in_channels, in_channels, kernel_size=3, stride=stride, groups=in_channels)
        self.pw = _conv_bn_relu(in_channels, out_channels, kernel_size=1, stride=1, groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNetV1: conv3x3 stride-2 stem, 13 depthwise-separable blocks, global avg pool, linear."""

    def __init__(
        self,
        num_classes: int = 1000,
        blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS,
        stem_width: int = MOBILENET_V1_STEM_WIDTH,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_drop_rates("mobilenet_v1", drop_rate, drop_path_rate)
        self.drop_rate = drop_rate
        self.stem = _conv_bn_relu(in_channels, stem_width, kernel_size=3, stride=MOBILENET_V1_STEM_STRIDE, groups=1)
        layers: list[nn.Module] = []
        channels = stem_width
        for width, stride in blocks:
            layers.append(DepthwiseSeparable(channels, width, stride))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_tf_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(self.stem(x))), 1)
        return self.fc(F.dropout(x, self.drop_rate, self.training))


@register_model(input_size=IMAGENET_INPUT_SIZE)
def mobilenet_v1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """Standard 1.0x MobileNetV1."""
    return MobileNetV1(num_classes=num_classes, **kwargs)
