"""Parquet shards: export a dataset to Parquet and read it back with pyarrow (no Ray).

Shard schema: ``image`` (binary: encoded PNG, or the original JPEG/PNG file bytes for ImageFolder) and
``label`` (int64). The schema metadata key ``dyrep_ray`` holds JSON: dataset name, split, num_classes, classes.

Writer and reader need only pyarrow and PIL: :class:`ParquetImageDataset` is a map-style torch Dataset over
the shards (``--local``). Streaming them to Ray Train workers through Ray Data is
:mod:`dyrep_ray.distributed.ray_data`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .builder import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SYNTHETIC_TRAIN_SIZE,
    DEFAULT_SYNTHETIC_VAL_SIZE,
    IMAGENET,
    SYNTHETIC,
    check_dataset_name,
)
from .cifar import CIFAR_LAYOUTS, CIFAR_SIDE, load_cifar_split
from .errors import DatasetError
from .imagefolder import load_image_folder
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, build_synthetic
from .transforms import (
    cifar_train_transform,
    cifar_val_transform,
    imagenet_train_transform,
    imagenet_val_transform,
    resolve_aug,
)

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
METADATA_KEY = b"dyrep_ray"
SPLITS = ("train", "val")
DEFAULT_ROWS_PER_SHARD = 10_000
SHARD_SUFFIX = ".parquet"
_TMP_SUFFIX = ".tmp"
_PNG = "PNG"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``<split>-00000.parquet``."""
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def _encode_png(pixels_hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format=_PNG)
    return buffer.getvalue()


def _encoded_rows(
    dataset_name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    image_size: int,
    seed: int,
    synthetic_train_size: int,
    synthetic_val_size: int,
) -> tuple[int, Callable[[int], tuple[bytes, int]], list[str]]:
    """(row count, row index -> (encoded image, label), class names) of one split."""
    train = split == "train"
    if dataset_name == SYNTHETIC:
        train_set, val_set, _ = build_synthetic(
            image_size=image_size, seed=seed, train_size=synthetic_train_size, val_size=synthetic_val_size
        )
        chosen = train_set if train else val_set
        pixels = chosen.pixels.numpy()
        return len(chosen), lambda i: (_encode_png(pixels[i]), chosen.targets[i]), chosen.classes
    if dataset_name in CIFAR_LAYOUTS:
        cifar = load_cifar_split(dataset_name, data_dir, train=train)
        return len(cifar), lambda i: (_encode_png(cifar.data[i]), cifar.targets[i]), cifar.classes
    folder = load_image_folder(data_dir, split)

    def read_file(index: int) -> tuple[bytes, int]:
        path, label = folder.samples[index]
        return Path(path).read_bytes(), int(label)

    return len(folder), read_file, list(folder.classes)


def _write_shard(path: Path, images: list[bytes], labels: list[int], metadata: bytes) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [pa.field(IMAGE_COLUMN, pa.binary()), pa.field(LABEL_COLUMN, pa.int64())],
        metadata={METADATA_KEY: metadata},
    )
    table = pa.Table.from_arrays([pa.array(images, pa.binary()), pa.array(labels, pa.int64())], schema=schema)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export_parquet(
    dataset_name: str,
    data_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    split: str,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    synthetic_train_size: int = DEFAULT_SYNTHETIC_TRAIN_SIZE,
    synthetic_val_size: int = DEFAULT_SYNTHETIC_VAL_SIZE,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``split`` (``train`` or ``val``; CIFAR's test set is ``val``) of a dataset as Parquet shards.

    Images are stored un-augmented (PNG for synthetic/CIFAR, original file bytes for ImageFolder); the reader
    applies augmentation. ``image_size``, ``seed`` and the synthetic sizes only matter for ``synthetic``.
    Returns the shard paths in order. Existing shards of the same split in ``out_dir`` are an error unless
    ``overwrite`` (then they are removed, after the source was read successfully).
    """
    check_dataset_name(dataset_name)
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if rows_per_shard < 1:
        raise DatasetError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir).expanduser()
    existing = sorted(out.glob(f"{split}-*{SHARD_SUFFIX}")) if out.is_dir() else []
    if existing and not overwrite:
        raise DatasetError(
            f"{out} already holds {len(existing)} {split} shard(s); pass overwrite=True or choose another out_dir"
        )
    count, row, classes = _encoded_rows(
        dataset_name,
        data_dir,
        split,
        image_size=image_size,
        seed=seed,
        synthetic_train_size=synthetic_train_size,
        synthetic_val_size=synthetic_val_size,
    )
    info: dict[str, Any] = {"dataset": dataset_name, "split": split, "num_classes": len(classes), "classes": classes}
    if dataset_name == SYNTHETIC:
        info.update(image_size=image_size, seed=seed)
    elif dataset_name in CIFAR_LAYOUTS:
        info.update(image_size=CIFAR_SIDE)
    metadata = json.dumps(info).encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    for stale in existing:
        stale.unlink()
    paths: list[Path] = []
    for shard_index, start in enumerate(range(0, count, rows_per_shard)):
        images: list[bytes] = []
        labels: list[int] = []
        for index in range(start, min(start + rows_per_shard, count)):
            encoded, label = row(index)
            images.append(encoded)
            labels.append(label)
        path = out / shard_name(split, shard_index)
        _write_shard(path, images, labels, metadata)
        paths.append(path)
    logger.info("exported %s %s: %d rows in %d shard(s) to %s", dataset_name, split, count, len(paths), out)
    return paths


def _parquet_files(path: str | os.PathLike) -> list[Path]:
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    files = sorted(root.glob(f"*{SHARD_SUFFIX}")) if root.is_dir() else []
    if not files:
        raise DatasetError(f"no {SHARD_SUFFIX} files at {root}; write them with export_parquet(...)")
    return files


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dyrep_ray`` metadata (dataset, split, num_classes, classes, ...) of a shard or shard directory."""
    import pyarrow.parquet as pq

    first = _parquet_files(path)[0]
    schema = pq.read_schema(first)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DatasetError(f"{first} has no {METADATA_KEY.decode()} metadata; it was not written by export_parquet")
    return json.loads(raw)


def parquet_row_count(path: str | os.PathLike) -> int:
    """Rows in a shard or shard directory, from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in _parquet_files(path))


def decode_image(encoded: bytes) -> Image.Image:
    """Encoded PNG/JPEG bytes -> RGB PIL image."""
    with Image.open(io.BytesIO(encoded)) as image:
        return image.convert("RGB")


def sample_transform(
    dataset: str, *, train: bool, image_size: int = DEFAULT_IMAGE_SIZE, aug: Mapping[str, Any] | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The per-image transform :func:`build_datasets` uses for ``dataset`` (PIL image -> normalized tensor)."""
    check_dataset_name(dataset)
    config = resolve_aug(aug)
    if dataset == SYNTHETIC:
        return T.Compose([T.ToTensor(), T.Normalize(*config.mean_std(SYNTHETIC_MEAN, SYNTHETIC_STD))])
    if dataset in CIFAR_LAYOUTS:
        return (cifar_train_transform if train else cifar_val_transform)(image_size, config)
    assert dataset == IMAGENET
    return (imagenet_train_transform if train else imagenet_val_transform)(image_size, config)


class ParquetImageDataset(Dataset):
    """Map-style torch Dataset over exported shards (read with pyarrow, no Ray), items ``(tensor, int)``."""

    def __init__(self, path: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None) -> None:
        import pyarrow.parquet as pq

        files = _parquet_files(path)
        self.images: list[bytes] = []
        self.targets: list[int] = []
        for file in files:
            table = pq.read_table(file, columns=[IMAGE_COLUMN, LABEL_COLUMN])
            self.images.extend(table.column(IMAGE_COLUMN).to_pylist())
            self.targets.extend(int(label) for label in table.column(LABEL_COLUMN).to_pylist())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = decode_image(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
