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
import random
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..limits import MAX_NUM_CLASSES
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
# Decoded images larger than this are refused before decoding (a 17 KB PNG can declare 12000 x 12000 pixels).
MAX_IMAGE_PIXELS = 50_000_000


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
    foreign = sorted(f for f in out.glob(f"*{SHARD_SUFFIX}") if f not in existing) if out.is_dir() else []
    if foreign:
        raise DatasetError(
            f"{out} already holds other shards (e.g. {foreign[0].name}); a directory holds one split only: "
            f"write {split} into its own directory (prepare --split both writes <out>/train and <out>/val)"
        )
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


def _check_columns(file: Path, schema) -> None:
    """Refuse a shard whose image column is not encoded bytes or whose label column is not integers."""
    import pyarrow as pa

    for column, ok, wanted in ((IMAGE_COLUMN, (pa.types.is_binary, pa.types.is_large_binary), "binary (encoded "
                                "PNG/JPEG bytes)"), (LABEL_COLUMN, (pa.types.is_integer,), "integer class indices")):
        kind = schema.field(column).type if schema.get_field_index(column) >= 0 else "missing"
        if kind == "missing" or not any(test(kind) for test in ok):
            raise DatasetError(f"{file}: column {column!r} is {kind}, not {wanted}; re-export the data with "
                               "dyrep-ray prepare")


def _shard_metadata(file: Path) -> dict[str, Any] | None:
    """The ``dyrep_ray`` metadata of one shard (None if it has none); a one-line error if unreadable."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{file}: not a readable Parquet file ({exc})".splitlines()[0]) from None
    _check_columns(file, schema)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DatasetError(f"{file}: its {METADATA_KEY.decode()} metadata is not JSON ({exc})") from None
    if not isinstance(info, dict):
        raise DatasetError(f"{file}: its {METADATA_KEY.decode()} metadata is not a JSON object")
    return info


def _parquet_files(path: str | os.PathLike) -> list[Path]:
    """The shard files at ``path``; refuses a directory whose shards record different splits."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    files = sorted(root.glob(f"*{SHARD_SUFFIX}")) if root.is_dir() else []
    if not files:
        hint = ""
        if root.is_dir() and any((root / s).is_dir() for s in SPLITS):
            hint = f" (it has {'/'.join(SPLITS)} subdirectories: point at {root}/train and {root}/val)"
        raise DatasetError(f"no {SHARD_SUFFIX} files at {root}{hint}; write them with dyrep-ray prepare")
    splits = {}
    for file in files:
        info = _shard_metadata(file)
        splits.setdefault(info.get("split") if info else None, file)
    if len(splits) > 1:
        shown = ", ".join(f"{split} ({file.name})" for split, file in splits.items())
        raise DatasetError(f"{root} mixes shards of different splits: {shown}; keep train and val shards in "
                           "separate directories (dyrep-ray prepare --split both writes <out>/train and <out>/val)")
    return files


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dyrep_ray`` metadata (dataset, split, num_classes, classes, ...) of a shard or shard directory."""
    first = _parquet_files(path)[0]
    info = _shard_metadata(first)
    if info is None:
        raise DatasetError(f"{first} has no {METADATA_KEY.decode()} metadata; it was not written by export_parquet")
    num_classes = info.get("num_classes")
    if type(num_classes) is not int or not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise DatasetError(f"{first}: metadata num_classes must be an integer in [1, {MAX_NUM_CLASSES}] (the cap "
                           f"of the num_classes config key), got {num_classes!r}"[:200]
                           + "; re-export the data with dyrep-ray prepare")
    if not isinstance(info.get("dataset"), str):
        raise DatasetError(f"{first}: metadata names no dataset (a string)")
    return info


def recorded_split(path: str | os.PathLike) -> str | None:
    """The split the shards at ``path`` record (None for shards without dyrep-ray metadata)."""
    info = _shard_metadata(_parquet_files(path)[0])
    split = info.get("split") if info else None
    return split if isinstance(split, str) else None


def resolve_parquet_splits(train: str | None, val: str | None) -> dict[str, str]:
    """``{"parquet_train", "parquet_val"}`` checked against the splits the shards record.

    ``parquet_val`` is never the training data: when it is unset it is derived only from the layout
    ``prepare --split both`` writes (``<D>/train`` given -> ``<D>/val``; ``<D>`` given -> ``<D>/train`` and
    ``<D>/val``), otherwise refused with one line.  Object-store URIs are not inspected here.
    """
    if not train:
        raise DatasetError("dataset 'parquet' needs parquet_train; e.g. --set parquet_train=/data/pq/train")
    remote = "://" in str(train) and not str(train).startswith("file://")
    if remote:
        if not val:
            raise DatasetError("parquet_val is not set; pass --set parquet_val=... (validation never "
                               "defaults to the training shards)")
        return {"parquet_train": str(train), "parquet_val": str(val)}
    root = Path(train).expanduser().absolute()  # Ray workers run in other directories
    if not root.exists():
        raise DatasetError(f"parquet_train {train} does not exist; point it at the shards dyrep-ray prepare wrote")
    if root.is_dir() and not any(root.glob(f"*{SHARD_SUFFIX}")) and (root / SPLITS[0]).is_dir():
        train_path, derived_val = root / SPLITS[0], root / SPLITS[1]
    else:
        train_path, derived_val = root, root.parent / SPLITS[1] if root.name == SPLITS[0] else None
    if val:
        val_path = Path(val).expanduser().absolute()
    elif derived_val is not None and derived_val.is_dir():
        val_path = derived_val
    else:
        raise DatasetError(f"parquet_val is not set and {train} has no sibling '{SPLITS[1]}' directory written "
                           "by dyrep-ray prepare; pass --set parquet_val=... (validation never defaults to the "
                           "training shards)")
    if train_path.resolve() == val_path.resolve():
        raise DatasetError(f"parquet_train and parquet_val are the same ({train_path}); validation must not run "
                           "on the training shards")
    for wanted, path in zip(SPLITS, (train_path, val_path)):
        found = recorded_split(path)
        if found is not None and found != wanted:
            raise DatasetError(f"parquet_{wanted} {path} holds shards recorded as split {found!r}; "
                               f"point parquet_{wanted} at the {wanted} shards")
        if parquet_row_count(path) == 0:
            raise DatasetError(f"parquet_{wanted} {path} holds no rows; point parquet_{wanted} at a non-empty "
                               "set of shards")
    return {"parquet_train": str(train_path), "parquet_val": str(val_path)}


def parquet_row_count(path: str | os.PathLike) -> int:
    """Rows in a shard or shard directory, from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in _parquet_files(path))


def check_image_pixels(image: Image.Image, where: str) -> None:
    """Refuse, before decoding, an image declaring more than :data:`MAX_IMAGE_PIXELS` pixels."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{where}: image of {width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel cap; "
                           "resize it or remove it from the dataset")


def recorded_image_side(info: Mapping[str, Any] | None) -> int | None:
    """The side every image of a synthetic/CIFAR export has (its metadata's ``image_size``); None otherwise
    (ImageFolder exports keep the original files, of any size: their transforms resize)."""
    side = (info or {}).get("image_size")
    dataset = (info or {}).get("dataset")
    if (dataset == SYNTHETIC or dataset in CIFAR_LAYOUTS) and type(side) is int and side > 0:
        return side
    return None


def check_image_side(image: Image.Image, side: int | None, where: str) -> None:
    """Refuse an image whose size differs from the set's recorded ``side`` (it would fail batching later)."""
    if side is not None and image.size != (side, side):
        raise DatasetError(f"{where}: image is {image.size[0]}x{image.size[1]} pixels but the set's metadata "
                           f"records {side}x{side} images; resize it or remove it from the dataset")


def decode_image(encoded: bytes, where: str = "image") -> Image.Image:
    """Encoded PNG/JPEG bytes -> RGB PIL image; :class:`DatasetError` naming ``where`` if it is not one."""
    if encoded is None:
        raise DatasetError(f"{where}: the image is null; re-export the data with dyrep-ray prepare")
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            check_image_pixels(image, where)
            return image.convert("RGB")
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated / not an image
        raise DatasetError(f"{where}: not a decodable image ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from None


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


#: Per-image steps whose output is the float CHW tensor (torchvision's and timm's "to tensor" steps).
_TO_TENSOR_STEPS = ("ToTensor", "MaybeToTensor")
#: uint8 pixel range: ``ToTensor`` divides by this.
PIXEL_MAX = 255


@dataclass(frozen=True)
class SplitTransform:
    """A :func:`sample_transform` cut at its ``ToTensor``/``Normalize`` pair, for batch pipelines.

    ``pixels`` (PIL -> PIL: resize, crop, flip, colour ops) runs per image; :func:`pixels_to_uint8` then gives a
    uint8 CHW tensor; :meth:`normalize` turns a uint8 batch into exactly what ``ToTensor`` + ``Normalize`` give
    per image (same float32 operations, so bitwise equal); ``after_normalize`` (Cutout, random erasing: they
    work on normalized values) runs per image last.  The steps are the very objects of the full transform.
    """

    pixels: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    after_normalize: tuple[Callable[[torch.Tensor], torch.Tensor], ...]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N)CHW -> float32 normalized, as ``Normalize(ToTensor(image))``."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return images.to(torch.float32).div(PIXEL_MAX).sub(mean).div(std)

    def finish(self, image_uint8: torch.Tensor) -> torch.Tensor:
        """One uint8 CHW image -> the full transform's output (normalize, then the post-normalize steps)."""
        image = self.normalize(image_uint8)
        for step in self.after_normalize:
            image = step(image)
        return image


def split_transform(transform: Callable[[Image.Image], torch.Tensor]) -> SplitTransform:
    """Cut a :func:`sample_transform` (a ``Compose`` with one to-tensor step followed by ``Normalize``)."""
    steps = list(getattr(transform, "transforms", ()))
    names = [type(step).__name__ for step in steps]
    cut = next((i for i, name in enumerate(names) if name in _TO_TENSOR_STEPS), None)
    if cut is None or cut + 1 >= len(steps) or not isinstance(steps[cut + 1], T.Normalize):
        raise DatasetError(f"transform {names} has no to-tensor step followed by Normalize; cannot batch it")
    norm = steps[cut + 1]
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
    return SplitTransform(T.Compose(steps[:cut]), mean, std, tuple(steps[cut + 2:]))


def pixels_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor (the integer part of ``ToTensor``)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def sample_seed(base_seed: int, epoch: int, encoded: bytes, label: int) -> int:
    """Seed of one row's augmentation in one epoch: the same for a rerun, different across epochs.

    Keyed by the row's content (CRC-32 of the encoded bytes, and its label), so it does not depend on how the
    streaming pipeline batches, orders or shards the rows.
    """
    entropy = [int(base_seed) & 0xFFFFFFFF, int(epoch), zlib.crc32(encoded), int(label) & 0xFFFFFFFF]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_sample_rngs(seed: int) -> None:
    """Seed the global RNGs torchvision (torch), timm (``random``) and RandAugment (numpy) draw from."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class ParquetImageDataset(Dataset):
    """Map-style torch Dataset over exported shards (read with pyarrow, no Ray), items ``(tensor, int)``.

    Refuses, at construction, null images and labels that are not integers in ``[0, num_classes)`` (from the
    shards' metadata), naming the file and row.  (Skipping bad samples with a count is not offered yet.)
    """

    def __init__(self, path: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None) -> None:
        import pyarrow.parquet as pq

        files = _parquet_files(path)
        info = _shard_metadata(files[0]) or {}
        num_classes = info.get("num_classes") if type(info.get("num_classes")) is int else None
        self.image_side = recorded_image_side(info)
        self.images: list[bytes] = []
        self.targets: list[int] = []
        self._where: list[tuple[Path, int]] = []  # (file, first row) per file, for error messages
        for file in files:
            try:
                table = pq.read_table(file, columns=[IMAGE_COLUMN, LABEL_COLUMN])
            except (OSError, ValueError, KeyError) as exc:
                raise DatasetError(f"{file}: cannot read columns {IMAGE_COLUMN!r}/{LABEL_COLUMN!r} "
                                   f"({exc})".splitlines()[0]) from None
            values = table.column(LABEL_COLUMN).to_pylist()  # an integer column (_parquet_files checked)
            for row, label in enumerate(values):
                if label is None or label < 0 or (num_classes is not None and label >= num_classes):
                    raise DatasetError(f"{file} row {row}: label {label!r} is not a class index in "
                                       f"[0, {num_classes if num_classes is not None else 'num_classes'})")
            images = table.column(IMAGE_COLUMN).to_pylist()
            for row, image in enumerate(images):
                if image is None:
                    raise DatasetError(f"{file} row {row}: the image is null; re-export the data")
            self._where.append((file, len(self.targets)))
            self.images.extend(images)
            self.targets.extend(int(label) for label in values)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def _describe(self, index: int) -> str:
        file, first = next((f, start) for f, start in reversed(self._where) if start <= index)
        return f"{file} row {index - first}"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            image = decode_image(self.images[index], "image")
            check_image_side(image, self.image_side, "image")
        except DatasetError as exc:
            raise DatasetError(str(exc).replace("image:", f"{self._describe(index)}:", 1)) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
