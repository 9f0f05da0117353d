"""torchvision ResNets (weights=None). The architecture is kept unchanged at every input size.

``drop_rate`` > 0 applies dropout to the classifier input through a forward pre-hook on ``fc``, so the
state_dict layout stays exactly torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision.models as tvm
from torchvision.models.resnet import ResNet

from .registry import IMAGENET_INPUT_SIZE, register_model
from .regularization import add_input_dropout, check_drop_rates


def _build(name: str, factory: Callable[..., ResNet], num_classes: int, kwargs: dict[str, Any]) -> ResNet:
    if kwargs.pop("weights", None) is not None or kwargs.pop("pretrained", False):
        raise ValueError(f"{name}: pretrained weights are not supported (no downloads); build with weights=None")
    drop_rate = float(kwargs.pop("drop_rate", 0.0))
    drop_path_rate = float(kwargs.pop("drop_path_rate", 0.0))
    check_drop_rates(name, drop_rate, drop_path_rate)
    model = factory(weights=None, num_classes=num_classes, **kwargs)
    add_input_dropout(model.fc, drop_rate)
    return model


@register_model(input_size=IMAGENET_INPUT_SIZE)
def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """torchvision ResNet-18, randomly initialised."""
    return _build("resnet18", tvm.resnet18, num_classes, kwargs)


@register_model(input_size=IMAGENET_INPUT_SIZE)
def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """torchvision ResNet-34, randomly initialised."""
    return _build("resnet34", tvm.resnet34, num_classes, kwargs)


@register_model(input_size=IMAGENET_INPUT_SIZE)
def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """torchvision ResNet-50, randomly initialised."""
    return _build("resnet50", tvm.resnet50, num_classes, kwargs)
