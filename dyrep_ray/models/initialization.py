"""The original DyRep's TF-style weight init for its own CIFAR VGG-16 and MobileNetV1.

image_classification_sota initializes those two networks as TensorFlow's slim models do (ResNets keep
torchvision's init there, and here):

* ``Conv2d``: weight ~ N(0, sqrt(2 / (k_h * k_w * out_channels))) (He/fan-out; a depthwise conv uses its
  ``out_channels`` too), bias 0;
* ``BatchNorm2d``: gamma 1, beta 0;
* ``Linear``: weight ~ U(-1/sqrt(out_features), +1/sqrt(out_features)), bias 0.

With BN the weight scale sets the effective learning rate, and synflow scales with 1/||W||^2, so the init
decides which convs DyRep grows: matching it matters for fidelity, not just for accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

CONV_GAIN = 2.0  # He init: variance 2 / fan


def conv_init_std(conv: nn.Conv2d) -> float:
    """Standard deviation of the TF-style init of ``conv``: sqrt(2 / (k_h * k_w * out_channels))."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    return math.sqrt(CONV_GAIN / fan_out)


def linear_init_bound(linear: nn.Linear) -> float:
    """Half-width of the TF-style uniform init of ``linear``: 1 / sqrt(out_features)."""
    return 1.0 / math.sqrt(linear.out_features)


@torch.no_grad()
def init_tf_style(model: nn.Module) -> nn.Module:
    """Re-initialize every Conv2d, BatchNorm2d and Linear of ``model`` in place as the original does."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.normal_(0.0, conv_init_std(module))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            if module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
        elif isinstance(module, nn.Linear):
            bound = linear_init_bound(module)
            module.weight.uniform_(-bound, bound)
            if module.bias is not None:
                module.bias.zero_()
    return model
