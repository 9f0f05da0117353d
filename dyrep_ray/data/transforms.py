"""Per-sample transforms: CIFAR (as the original DyRep code) and ImageNet (timm), plus Cutout."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torchvision import transforms as T

from .errors import DatasetError

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_IMAGE_SIZE = 32
CIFAR_CROP_PADDING_FRACTION = 0.125  # RandomCrop(32, padding=4)
IMAGENET_CROP_PCT = 0.875            # val: resize int(size / 0.875) (256 at 224), then centre-crop size

# The augmentation defaults of every dyrep-ray run: all augmentation off but crop/flip (TrainConfig's defaults
# and these must agree; this is their owner).  The shipped experiments turn on what the DyRep strategies use
# (CIFAR: cutout 16; ImageNet ResNet: color jitter 0.06, remode const).
DEFAULT_CUTOUT_LENGTH = 0
DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_AUTO_AUGMENT: str | None = None
DEFAULT_COLOR_JITTER = 0.0
DEFAULT_REPROB = 0.0
DEFAULT_REMODE = "pixel"
#: Cutout's side in the original DyRep/DARTS CIFAR recipe.
DARTS_CUTOUT_LENGTH = 16

_INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class AugConfig:
    """Augmentation settings; build from the user's ``aug`` dict with :func:`resolve_aug`."""

    aa: str | None = DEFAULT_AUTO_AUGMENT
    reprob: float = DEFAULT_REPROB
    remode: str = DEFAULT_REMODE
    color_jitter: float | None = DEFAULT_COLOR_JITTER
    cutout_length: int = DEFAULT_CUTOUT_LENGTH
    interpolation: str = DEFAULT_INTERPOLATION
    image_mean: tuple[float, ...] | None = None  # None: the dataset's own normalization constants
    image_std: tuple[float, ...] | None = None

    def mean_std(self, default_mean: tuple[float, ...], default_std: tuple[float, ...]) -> tuple[tuple, tuple]:
        """The normalization to use: the overrides when given, else the dataset defaults."""
        mean = tuple(self.image_mean) if self.image_mean is not None else default_mean
        std = tuple(self.image_std) if self.image_std is not None else default_std
        return mean, std


AUG_KEYS = tuple(field.name for field in fields(AugConfig))


def resolve_aug(aug: Mapping[str, Any] | None) -> AugConfig:
    """Validate an ``aug`` dict (all keys optional) and fill in defaults."""
    if aug is None:
        return AugConfig()
    if isinstance(aug, AugConfig):
        return aug
    unknown = sorted(set(aug) - set(AUG_KEYS))
    if unknown:
        raise DatasetError(f"unknown aug key(s) {unknown}; valid keys: {', '.join(AUG_KEYS)}")
    defaults = AugConfig()
    values = dict(aug)
    for key, value in list(values.items()):
        # None means "default" for settings whose default is not None (aa/color_jitter/mean/std None = off/dataset)
        if value is None and getattr(defaults, key) is not None:
            del values[key]
    config = AugConfig(**values)
    for key in ("image_mean", "image_std"):
        value = getattr(config, key)
        if value is not None and (len(value) != 3 or (key == "image_std" and min(value) <= 0)):
            raise DatasetError(f"aug {key} must be 3 numbers (positive for std), got {value!r}")
    if config.interpolation not in _INTERPOLATIONS:
        raise DatasetError(
            f"aug interpolation {config.interpolation!r} is not supported; use one of {', '.join(_INTERPOLATIONS)}"
        )
    if config.cutout_length < 0:
        raise DatasetError(f"aug cutout_length must be >= 0 (0 disables Cutout), got {config.cutout_length}")
    if not 0.0 <= config.reprob <= 1.0:
        raise DatasetError(f"aug reprob must be in [0, 1], got {config.reprob}")
    return config


class Cutout:
    """Zero one random ``length`` x ``length`` square (clipped at the border) of a CHW tensor.

    As in the original DyRep/DARTS code it runs after normalization, so the hole holds the dataset mean.
    Uses torch's global RNG (seeded per DataLoader worker by PyTorch).
    """

    def __init__(self, length: int = DARTS_CUTOUT_LENGTH) -> None:
        self.length = int(length)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.length <= 0:
            return image
        height, width = image.shape[-2:]
        centre_y = int(torch.randint(height, (1,)))
        centre_x = int(torch.randint(width, (1,)))
        half = self.length // 2
        y0, y1 = max(0, centre_y - half), min(height, centre_y + half)
        x0, x1 = max(0, centre_x - half), min(width, centre_x + half)
        image = image.clone()
        image[..., y0:y1, x0:x1] = 0
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


def _resize_if_needed(image_size: int, interpolation: str) -> list[Callable]:
    if image_size == CIFAR_IMAGE_SIZE:
        return []
    return [T.Resize((image_size, image_size), interpolation=_INTERPOLATIONS[interpolation])]


def cifar_train_transform(image_size: int = CIFAR_IMAGE_SIZE, aug: AugConfig | None = None) -> T.Compose:
    """RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, Cutout (original DyRep order)."""
    aug = aug or AugConfig()
    padding = int(round(image_size * CIFAR_CROP_PADDING_FRACTION))
    steps: list[Callable] = _resize_if_needed(image_size, aug.interpolation)
    steps += [
        T.RandomCrop(image_size, padding=padding),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(*aug.mean_std(CIFAR_MEAN, CIFAR_STD)),
    ]
    if aug.cutout_length > 0:
        steps.append(Cutout(aug.cutout_length))
    return T.Compose(steps)


def cifar_val_transform(image_size: int = CIFAR_IMAGE_SIZE, aug: AugConfig | None = None) -> T.Compose:
    """ToTensor, Normalize (after a resize when image_size != 32)."""
    aug = aug or AugConfig()
    return T.Compose(
        _resize_if_needed(image_size, aug.interpolation)
        + [T.ToTensor(), T.Normalize(*aug.mean_std(CIFAR_MEAN, CIFAR_STD))]
    )


def imagenet_train_transform(image_size: int, aug: AugConfig | None = None) -> Callable:
    """timm's training transform: RandomResizedCrop, flip, RandAugment or colour jitter, random erasing."""
    from timm.data import create_transform

    aug = aug or AugConfig()
    mean, std = aug.mean_std(IMAGENET_MEAN, IMAGENET_STD)
    return create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=aug.color_jitter if aug.color_jitter else 0.0,
        auto_augment=aug.aa or None,
        interpolation=aug.interpolation,
        re_prob=aug.reprob,
        re_mode=aug.remode,
        mean=mean,
        std=std,
    )


def imagenet_val_transform(image_size: int, aug: AugConfig | None = None) -> T.Compose:
    """Resize to int(image_size / 0.875) (256 at 224), centre-crop image_size, ToTensor, Normalize."""
    aug = aug or AugConfig()
    return T.Compose(
        [
            T.Resize(int(image_size / IMAGENET_CROP_PCT), interpolation=_INTERPOLATIONS[aug.interpolation]),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(*aug.mean_std(IMAGENET_MEAN, IMAGENET_STD)),
        ]
    )
