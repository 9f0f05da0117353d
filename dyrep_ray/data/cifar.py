"""CIFAR-10 / CIFAR-100 from the standard *python version* directories, read without running pickled code.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html, "python version")::

    <data_dir>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

``data_dir`` may also point at the batches directory itself. Nothing is ever downloaded.

The files are pickles. They are read by :class:`RestrictedUnpickler`, which resolves only the few numpy
helpers that rebuild arrays; any other global (``os.system``, ``builtins.open``, ...) is refused, so a
malicious file cannot run code.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError

logger = logging.getLogger(__name__)

CIFAR_SIDE = 32
CIFAR_CHANNELS = 3
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE  # 3072: R plane, G plane, B plane
_DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels."""

    name: str
    directory: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR10 = CifarLayout(
    name="cifar10",
    directory="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{index}" for index in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
)
CIFAR100 = CifarLayout(
    name="cifar100",
    directory="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
)
CIFAR_LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}


# ---------------------------------------------------------------------------------------------------------------
# restricted unpickling
# ---------------------------------------------------------------------------------------------------------------

_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1"})


def _codecs_encode_latin1(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` (how Python 3 protocol-2 pickles store bytes): latin-1 only."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError("refusing _codecs.encode with anything but a str and latin-1")
    return obj.encode("latin1", errors)


def _numpy_helpers() -> dict[tuple[str, str], Any]:
    """The numpy callables that array/dtype reconstruction needs, under every module path numpy used."""
    try:
        from numpy._core import multiarray as _multiarray
        from numpy._core import numeric as _numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
        from numpy.core import numeric as _numeric  # type: ignore[no-redef]
    helpers: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs_encode_latin1,
    }
    for package in ("numpy.core", "numpy._core"):
        helpers[(f"{package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        helpers[(f"{package}.multiarray", "scalar")] = _multiarray.scalar
        if hasattr(_numeric, "_frombuffer"):
            helpers[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer
    return helpers


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as ``_reconstruct``'s first argument, not callable
    (``ndarray((10**6, 3072))`` called from a pickle would allocate before any check)."""


def _capped_reconstruct(max_bytes: int, real: Callable) -> Callable:
    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NdarrayToken and subtype is not np.ndarray:
            raise pickle.UnpicklingError("refusing to reconstruct anything but a plain numpy array")
        try:
            count = int(np.prod(np.asarray(shape, dtype=np.int64))) if np.ndim(shape) else int(shape)
            itemsize = np.dtype(dtype).itemsize
        except (TypeError, ValueError, OverflowError):
            raise pickle.UnpicklingError("array shape/dtype in the pickle is malformed") from None
        if count < 0 or count * itemsize > max_bytes:
            raise pickle.UnpicklingError(f"array of {count} x {itemsize} bytes declared by a file of {max_bytes} "
                                         "bytes (it would exhaust memory)")
        return real(np.ndarray, shape, dtype)
    return reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction helpers; every other global is refused.

    ``max_array_bytes`` (default: unlimited) caps every array the pickle asks numpy to allocate, so a
    240-byte file cannot declare a (10**6, 3072) array; :func:`restricted_load` sets it to the file size.
    """

    _allowed: dict[tuple[str, str], Any] | None = None
    max_array_bytes: int | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_helpers()
        if self.max_array_bytes is not None:
            if (module, name) == ("numpy", "ndarray"):
                return _NdarrayToken
            if name == "_reconstruct" and (module, name) in RestrictedUnpickler._allowed:
                return _capped_reconstruct(self.max_array_bytes, RestrictedUnpickler._allowed[(module, name)])
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array data is allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as CIFAR's Python-2 pickles need)."""
    with open(path, "rb") as handle:
        unpickler = RestrictedUnpickler(handle, encoding="bytes")
        unpickler.max_array_bytes = os.fstat(handle.fileno()).st_size  # an array's bytes come from the file
        return unpickler.load()


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _layout_help(layout: CifarLayout) -> str:
    files = ", ".join(layout.train_files + layout.test_files + (layout.meta_file,))
    return (
        f"expected <data_dir>/{layout.directory}/{{{files}}} (the 'python version' from {_DOWNLOAD_URL}, "
        f"extracted); no download is attempted"
    )


def find_cifar_dir(layout: CifarLayout, data_dir: str | os.PathLike | None) -> Path:
    """The batches directory: ``data_dir/<layout.directory>`` or ``data_dir`` itself if it holds the files."""
    if data_dir is None:
        raise DatasetError(f"{layout.name}: data_dir is required; {_layout_help(layout)}")
    root = Path(data_dir).expanduser()
    nested = root / layout.directory
    if nested.is_dir():
        return nested
    if (root / layout.train_files[0]).exists() or root.name == layout.directory:
        return root
    raise DatasetError(f"{layout.name}: no {layout.directory} directory under {root}; {_layout_help(layout)}")


def _load_file(layout: CifarLayout, path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{layout.name}: missing file {path}; {_layout_help(layout)}")
    try:
        content = restricted_load(path)
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"{layout.name}: {path} was refused or is not a CIFAR pickle ({exc}); "
                           f"{_layout_help(layout)}") from None
    except Exception as exc:  # truncated / corrupt files raise many types
        raise DatasetError(f"{layout.name}: cannot read {path} ({type(exc).__name__}: {exc}); "
                           f"{_layout_help(layout)}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{layout.name}: {path} holds a {type(content).__name__}, not a dict; "
                           f"{_layout_help(layout)}")
    return content


def _load_batch(layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    content = _load_file(layout, path)
    data = content.get(b"data")
    labels = content.get(layout.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(
            f"{layout.name}: {path} lacks b'data' (uint8 array N x {CIFAR_ROW_BYTES}) or "
            f"{layout.label_key!r} (list of N ints); {_layout_help(layout)}"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise DatasetError(
            f"{layout.name}: {path} b'data' is {data.dtype} {tuple(data.shape)}, expected uint8 "
            f"(N, {CIFAR_ROW_BYTES}); {_layout_help(layout)}"
        )
    integral = (labels.dtype.kind in "iu" if isinstance(labels, np.ndarray)
                else isinstance(labels, (list, tuple)) and all(type(label) is int for label in labels))
    if not integral:
        raise DatasetError(f"{layout.name}: {path} {layout.label_key!r} is not a list of ints (floats, bools "
                           f"and other values are refused); {_layout_help(layout)}")
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{layout.name}: {path} {layout.label_key!r} is not a list of int64 values; "
                           f"{_layout_help(layout)}") from None
    if label_array.shape[0] != data.shape[0]:
        raise DatasetError(f"{layout.name}: {path} has {data.shape[0]} images but {label_array.shape[0]} labels; "
                           f"{_layout_help(layout)}")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= layout.num_classes):
        raise DatasetError(f"{layout.name}: {path} has labels outside [0, {layout.num_classes}); "
                           f"{_layout_help(layout)}")
    images = data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_array


def _load_class_names(layout: CifarLayout, directory: Path) -> list[str]:
    path = directory / layout.meta_file
    content = _load_file(layout, path)
    names = content.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        raise DatasetError(
            f"{layout.name}: {path} must hold {layout.names_key!r}: a list of {layout.num_classes} names; "
            f"{_layout_help(layout)}"
        )
    return [name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name) for name in names]


class CifarDataset(Dataset):
    """One CIFAR split held in memory: ``data`` uint8 (N, 32, 32, 3), ``targets`` list of ints."""

    def __init__(
        self, data: np.ndarray, targets: list[int], classes: list[str], transform: Callable | None = None
    ) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def load_cifar_split(
    name: str, data_dir: str | os.PathLike | None, *, train: bool, transform: Callable | None = None
) -> CifarDataset:
    """Read the train or test split of ``cifar10`` / ``cifar100``; raises :class:`DatasetError` when malformed."""
    layout = CIFAR_LAYOUTS[name]
    directory = find_cifar_dir(layout, data_dir)
    classes = _load_class_names(layout, directory)
    parts = [_load_batch(layout, directory / file) for file in (layout.train_files if train else layout.test_files)]
    data = np.concatenate([images for images, _ in parts])
    targets = np.concatenate([labels for _, labels in parts]).tolist()
    logger.info("%s %s: %d images from %s", name, "train" if train else "test", len(targets), directory)
    return CifarDataset(data, targets, classes, transform)
