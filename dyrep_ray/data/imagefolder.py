"""ImageNet-style class folders: ``<data_dir>/train/<class>/*.jpg|png`` and ``<data_dir>/val/<class>/...``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from .errors import DatasetError

logger = logging.getLogger(__name__)

TRAIN_DIRNAME = "train"
VAL_DIRNAME = "val"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_LAYOUT = "expected <data_dir>/train/<class>/<image>.jpg|png and <data_dir>/val/<class>/...; no download is attempted"


# Decoded images larger than this are refused before decoding (same cap as the Parquet reader).
MAX_IMAGE_PIXELS = 50_000_000


def is_image_file(path: str) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def load_image_file(path: str) -> Image.Image:
    """RGB image at ``path``; :class:`DatasetError` naming the file when it is empty, truncated, not an image,
    or larger than :data:`MAX_IMAGE_PIXELS` (checked from the header, before decoding).
    (Skipping bad samples with a count is not offered yet: fix or remove the file.)"""
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{path}: image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel "
                                   "cap; resize it or remove it from the dataset")
            return image.convert("RGB")
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: not a decodable image ({type(exc).__name__}: {exc}); fix or remove "
                           "it".splitlines()[0]) from None


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that does not follow symlinks out of its root nor directory symlinks (no loops), and
    names the file when an image cannot be decoded."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        root_real = os.path.realpath(directory)
        check = is_valid_file or is_image_file
        instances, present = [], set()
        skipped = 0
        for target_class in sorted(class_to_idx):
            target_dir = os.path.join(directory, target_class)
            if not os.path.isdir(target_dir) or not _inside(target_dir, root_real) or os.path.islink(target_dir):
                skipped += 1
                continue
            for walk_root, _, fnames in sorted(os.walk(target_dir, followlinks=False)):
                for fname in sorted(fnames):
                    path = os.path.join(walk_root, fname)
                    if not check(path):
                        continue
                    if not _inside(path, root_real):
                        skipped += 1
                        continue
                    instances.append((path, class_to_idx[target_class]))
                    present.add(target_class)
        if skipped:
            logger.warning("imagenet: skipped %d symlink(s) leading out of %s or to directories", skipped, directory)
        empty = sorted(set(class_to_idx) - present)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty[:5])}")
        return instances


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
        dataset = SafeImageFolder(str(root), transform=transform, loader=load_image_file,
                                  is_valid_file=is_image_file)
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
