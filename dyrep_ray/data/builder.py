"""``build_datasets``: one entry point for every dataset the trainer can use."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from .cifar import CIFAR_LAYOUTS, load_cifar_split
from .errors import DatasetError
from .imagefolder import load_image_folders
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, build_synthetic
from .transforms import (
    cifar_train_transform,
    cifar_val_transform,
    imagenet_train_transform,
    imagenet_val_transform,
    resolve_aug,
)

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
IMAGENET = "imagenet"
DATASET_NAMES = (SYNTHETIC, *CIFAR_LAYOUTS, IMAGENET)
DEFAULT_SYNTHETIC_TRAIN_SIZE = 2048
DEFAULT_SYNTHETIC_VAL_SIZE = 512
DEFAULT_IMAGE_SIZE = 32


def check_dataset_name(dataset: str) -> str:
    """Return ``dataset`` if known, else raise a one-line :class:`DatasetError` suggesting the closest name."""
    if dataset in DATASET_NAMES:
        return dataset
    close = difflib.get_close_matches(dataset, DATASET_NAMES, n=1, cutoff=0.0)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    raise DatasetError(f"unknown dataset {dataset!r}; {suggestion}valid names: {', '.join(DATASET_NAMES)}")


def build_datasets(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    synthetic_train_size: int = DEFAULT_SYNTHETIC_TRAIN_SIZE,
    synthetic_val_size: int = DEFAULT_SYNTHETIC_VAL_SIZE,
    aug: Mapping[str, Any] | None = None,
) -> tuple[Dataset, Dataset, int]:
    """Build ``(train, val, num_classes)``; every item is ``(float32 CHW normalized tensor, int label)``.

    ``dataset``: ``synthetic`` (built-in, seeded, in memory), ``cifar10`` / ``cifar100`` (standard python-format
    directory under ``data_dir``) or ``imagenet`` (``data_dir/train/<class>/...``, ``data_dir/val/<class>/...``).
    ``aug`` keys (all optional): ``aa``, ``reprob``, ``remode``, ``color_jitter``, ``cutout_length``,
    ``interpolation``, ``image_mean``, ``image_std`` (normalization override; None = dataset default).
    ``seed`` only shapes the synthetic data; augmentation randomness comes from torch's RNG.
    Raises :class:`DatasetError` with a one-line message when something is missing or malformed.
    """
    check_dataset_name(dataset)
    if image_size < 1:
        raise DatasetError(f"image_size must be >= 1, got {image_size}")
    config = resolve_aug(aug)
    if dataset == SYNTHETIC:
        mean, std = config.mean_std(SYNTHETIC_MEAN, SYNTHETIC_STD)
        return build_synthetic(
            image_size=image_size,
            seed=seed,
            train_size=synthetic_train_size,
            val_size=synthetic_val_size,
            mean=mean,
            std=std,
        )
    if dataset in CIFAR_LAYOUTS:
        train = load_cifar_split(dataset, data_dir, train=True, transform=cifar_train_transform(image_size, config))
        val = load_cifar_split(dataset, data_dir, train=False, transform=cifar_val_transform(image_size, config))
        return train, val, CIFAR_LAYOUTS[dataset].num_classes
    return load_image_folders(
        data_dir, imagenet_train_transform(image_size, config), imagenet_val_transform(image_size, config)
    )
