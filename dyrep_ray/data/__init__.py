"""Datasets: synthetic (built-in default), CIFAR-10/100 (local python format), ImageFolder, Parquet/Ray Data.

``import dyrep_ray.data`` does not import Ray; the Ray Data reader lives in :mod:`dyrep_ray.data.parquet`.
"""

from .builder import DATASET_NAMES, build_datasets, check_dataset_name
from .cifar import CifarDataset, RestrictedUnpickler, load_cifar_split, restricted_load
from .errors import DatasetError
from .imagefolder import load_image_folder
from .synthetic import SYNTHETIC_NUM_CLASSES, SyntheticImageDataset, build_synthetic
from .transforms import (
    AUG_KEYS,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    Cutout,
    resolve_aug,
)

__all__ = [
    "AUG_KEYS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_NUM_CLASSES",
    "AugConfig",
    "CifarDataset",
    "Cutout",
    "DatasetError",
    "RestrictedUnpickler",
    "SyntheticImageDataset",
    "build_datasets",
    "build_synthetic",
    "check_dataset_name",
    "load_cifar_split",
    "load_image_folder",
    "restricted_load",
    "resolve_aug",
]
