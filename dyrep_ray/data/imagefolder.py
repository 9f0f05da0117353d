"""ImageNet-style class folders: ``<data_dir>/train/<class>/*.jpg|png`` and ``<data_dir>/val/<class>/...``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder

from .errors import DatasetError

logger = logging.getLogger(__name__)

TRAIN_DIRNAME = "train"
VAL_DIRNAME = "val"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_LAYOUT = "expected <data_dir>/train/<class>/<image>.jpg|png and <data_dir>/val/<class>/...; no download is attempted"


def is_image_file(path: str) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _split_dir(data_dir: str | os.PathLike | None, split: str) -> Path:
    if data_dir is None:
        raise DatasetError(f"imagenet: data_dir is required; {_LAYOUT}")
    path = Path(data_dir).expanduser() / split
    if not path.is_dir():
        raise DatasetError(f"imagenet: missing directory {path}; {_LAYOUT}")
    return path


def load_image_folder(
    data_dir: str | os.PathLike | None, split: str, transform: Callable | None = None
) -> ImageFolder:
    """``torchvision.datasets.ImageFolder`` over ``<data_dir>/<split>``; raises :class:`DatasetError` when empty."""
    root = _split_dir(data_dir, split)
    try:
        dataset = ImageFolder(str(root), transform=transform, is_valid_file=is_image_file)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"imagenet: no images under {root} ({exc}); {_LAYOUT}") from None
    logger.info("imagenet %s: %d images in %d classes from %s", split, len(dataset), len(dataset.classes), root)
    return dataset


def load_image_folders(
    data_dir: str | os.PathLike | None, train_transform: Callable | None, val_transform: Callable | None
) -> tuple[ImageFolder, ImageFolder, int]:
    """Train and val ImageFolders; their class lists must match."""
    train = load_image_folder(data_dir, TRAIN_DIRNAME, train_transform)
    val = load_image_folder(data_dir, VAL_DIRNAME, val_transform)
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))
        raise DatasetError(
            f"imagenet: train and val class folders differ ({len(train.classes)} vs {len(val.classes)}; "
            f"e.g. {missing[:5]}); both splits need the same <class> folders"
        )
    return train, val, len(train.classes)
