"""Model builders by name: small_cnn, vgg16_cifar, resnet18/34/50 (torchvision), mobilenet_v1, timm/<name>."""

from . import mobilenet, resnet, small_cnn, vgg  # noqa: F401  (register the built-in models)
from .complexity import count_macs, count_params
from .mobilenet import MobileNetV1
from .registry import (
    CIFAR_INPUT_SIZE,
    IMAGENET_INPUT_SIZE,
    TIMM_PREFIX,
    UnknownModelError,
    build_model,
    default_input_size,
    list_models,
    register_model,
)
from .small_cnn import SmallCNN
from .vgg import VGGCifar

__all__ = [
    "CIFAR_INPUT_SIZE",
    "IMAGENET_INPUT_SIZE",
    "TIMM_PREFIX",
    "MobileNetV1",
    "SmallCNN",
    "UnknownModelError",
    "VGGCifar",
    "build_model",
    "count_macs",
    "count_params",
    "default_input_size",
    "list_models",
    "register_model",
]
