"""The values config keys may take: the enum-like choices and the size limits (pure Python).

Below :mod:`~dyrep_ray.engine.config_checks` and :mod:`~dyrep_ray.engine.config_schema`, which both name them.
"""

from __future__ import annotations

from ..limits import MAX_NUM_CLASSES
from .config_rules import ConfigEnum

__all__ = [
    "AMP_UNSAFE_METRICS",
    "DATASET_NUM_CLASSES",
    "DATASETS_WITH_DIR",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_SIZE",
    "MAX_NUM_CLASSES",
    "MAX_SYNTHETIC_BYTES",
    "MAX_SYNTHETIC_SIZE",
    "SYNTHETIC_BYTES_PER_VALUE",
    "Amp",
    "BlockType",
    "CutMode",
    "CutOrder",
    "DbbConvert",
    "GrowOptimState",
    "SchedRule",
    "Dataset",
    "DyRepMetric",
    "Interpolation",
    "OnNonfinite",
    "Opt",
    "Remode",
    "Sched",
]


class Dataset(ConfigEnum):
    SYNTHETIC = "synthetic"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    IMAGENET = "imagenet"
    PARQUET = "parquet"


class Opt(ConfigEnum):
    SGD = "sgd"
    ADAMW = "adamw"


class Sched(ConfigEnum):
    COSINE = "cosine"
    STEP = "step"
    NONE = "none"


class SchedRule(ConfigEnum):
    ORIGINAL = "original"
    FRACTIONAL = "fractional"


class DbbConvert(ConfigEnum):
    ORIGINAL = "original"
    EVERY_CONV = "every_conv"


class GrowOptimState(ConfigEnum):
    RESTART = "restart"
    CARRY = "carry"


class CutOrder(ConfigEnum):
    ORIGINAL = "original"
    INNER_FIRST = "inner_first"


class Amp(ConfigEnum):
    NONE = "none"
    BF16 = "bf16"
    FP16 = "fp16"


class DyRepMetric(ConfigEnum):
    SYNFLOW = "synflow"
    SNIP = "snip"
    GRAD_NORM = "grad_norm"
    RANDOM = "random"


class OnNonfinite(ConfigEnum):
    SKIP = "skip"
    STOP = "stop"
    IGNORE = "ignore"


class Remode(ConfigEnum):
    PIXEL = "pixel"
    CONST = "const"
    RAND = "rand"


class Interpolation(ConfigEnum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class CutMode(ConfigEnum):
    """How a cut branch leaves a block."""

    RESET = "reset"  # the original: kxk BN reset, kxk conv set so the block's eval function is unchanged
    ABSORB = "absorb"  # dyrep-ray's first version: the cut branch folded into kxk, kxk BN statistics kept


class BlockType(ConfigEnum):
    BN = "bn"  # Diverse Branch Block, a BN after every branch (DBB / DyRep)
    ONLINE = "online"  # OREPA-style online re-parameterization


#: Class counts of datasets whose label set is fixed (``num_classes`` must match when given).
DATASET_NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}
#: Datasets read from files under ``data_dir``.
DATASETS_WITH_DIR = (Dataset.CIFAR10, Dataset.CIFAR100, Dataset.IMAGENET)
#: Metrics whose value under autocast is eps-scale noise for a conv followed by train-mode BN (sign flips).
AMP_UNSAFE_METRICS = (DyRepMetric.SYNFLOW, DyRepMetric.SNIP)

# Caps on what a few bytes of config could make the trainer allocate.
MAX_IMAGE_SIZE = 4096  # one 4096^2 RGB float32 image is 200 MB; 20000^2 would be 4.8 GB per image
MAX_SYNTHETIC_SIZE = 10_000_000  # images per synthetic split; what they occupy is capped by the next one
MAX_BATCH_SIZE = 65_536  # images per worker and step: far above any GPU's memory, far below an overflow
MAX_SYNTHETIC_BYTES = 8 * 2**30  # the synthetic splits live in memory: uint8 pixels + normalized float32 copy
SYNTHETIC_BYTES_PER_VALUE = 1 + 4
