"""The rules over several config keys, applied after every key passed its own rules (pure Python).

Each rule takes the config and raises :class:`~dyrep_ray.engine.config_rules.ConfigError` with one line naming
the keys and the fix; its docstring is its line in the configuration reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .config_rules import ConfigError
from .config_values import (
    AMP_UNSAFE_METRICS,
    DATASET_NUM_CLASSES,
    DATASETS_WITH_DIR,
    MAX_BATCH_SIZE,
    MAX_SYNTHETIC_BYTES,
    SYNTHETIC_BYTES_PER_VALUE,
    Amp,
    Dataset,
    Opt,
)

#: A :class:`~dyrep_ray.engine.config_schema.TrainConfig`, read by attribute. Not imported, not even for typing:
#: config_schema applies these rules, so this module stays below it in the import graph.
Config = Any

__all__ = ["CROSS_FIELD_RULES", "DEFAULT_BATCH_SIZE"]

#: batch_size's default (config_schema declares it with this value): the one value global_batch_size tolerates
#: beside global_batch_size / max workers, since a default cannot be told from an explicit 64.
DEFAULT_BATCH_SIZE = 64


def _synthetic_fits_memory(cfg: Config) -> None:
    """dataset synthetic: its train + val images of image_size (SYNTHETIC_BYTES_PER_VALUE bytes per value) fit in
    MAX_SYNTHETIC_BYTES of memory."""
    if cfg.dataset != Dataset.SYNTHETIC:
        return
    images = cfg.synthetic_train_size + cfg.synthetic_val_size
    need = images * 3 * cfg.image_size**2 * SYNTHETIC_BYTES_PER_VALUE
    if need > MAX_SYNTHETIC_BYTES:
        raise ConfigError(f"synthetic data of {images:,} images of {cfg.image_size}x{cfg.image_size} would take "
                          f"{need / 2**30:.1f} GiB of memory (at most {MAX_SYNTHETIC_BYTES / 2**30:.0f}); lower "
                          "synthetic_train_size / synthetic_val_size / image_size")


def _data_dir_given(cfg: Config) -> None:
    """a dataset read from files (DATASETS_WITH_DIR) needs data_dir."""
    if cfg.dataset in DATASETS_WITH_DIR and cfg.data_dir is None:
        place = {
            "cifar10": "the directory holding cifar-10-batches-py",
            "cifar100": "the directory holding cifar-100-python",
        }.get(cfg.dataset, "the ImageNet root holding train/ and val/")
        raise ConfigError(
            f"dataset '{cfg.dataset}' needs data_dir, {place}; e.g. --set data_dir=/path/to/data, "
            f"or dataset=synthetic to run without files"
        )


def _parquet_train_given(cfg: Config) -> None:
    """dataset parquet needs parquet_train."""
    if cfg.dataset == Dataset.PARQUET and cfg.parquet_train is None:
        raise ConfigError(
            "dataset 'parquet' needs parquet_train (a Parquet file/dir or URI with image and label columns); "
            "e.g. --set parquet_train=/data/train.parquet"
        )


def _num_classes_match(cfg: Config) -> None:
    """num_classes, when given, matches the class count of a dataset with a fixed label set (DATASET_NUM_CLASSES)."""
    expected = DATASET_NUM_CLASSES.get(cfg.dataset)
    if expected is not None and cfg.num_classes is not None and cfg.num_classes != expected:
        raise ConfigError(
            f"config key 'num_classes' is {cfg.num_classes} but dataset '{cfg.dataset}' has {expected} classes; "
            f"set num_classes=null (from the dataset) or num_classes={expected}"
        )


def _nesterov_needs_momentum(cfg: Config) -> None:
    """nesterov with opt sgd needs momentum > 0."""
    if cfg.opt == Opt.SGD and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(
            "config keys 'nesterov' and 'momentum': Nesterov SGD needs momentum > 0; "
            "set nesterov=false or e.g. momentum=0.9"
        )


def _dbb_is_not_dyrep(cfg: Config) -> None:
    """dbb (the static DBB baseline) and dyrep are not both true."""
    if cfg.dbb and cfg.dyrep:
        raise ConfigError(
            "config keys 'dbb' and 'dyrep': a static DBB baseline run (dbb: true) has no growth or cuts; "
            "set dyrep: false (--set dyrep=false), or dbb: false for a DyRep run"
        )


def _metric_safe_under_amp(cfg: Config) -> None:
    """dyrep with amp other than none: dyrep_metric is not one of AMP_UNSAFE_METRICS (their values flip sign)."""
    # synflow/snip of a conv before train-mode BN is eps-scale; bf16/fp16 flips its sign
    if cfg.dyrep and cfg.amp != Amp.NONE and cfg.dyrep_metric in AMP_UNSAFE_METRICS:
        raise ConfigError(
            f"config keys 'amp' and 'dyrep_metric': dyrep_metric '{cfg.dyrep_metric}' is unreliable under "
            f"amp '{cfg.amp}' (its eps-scale values flip sign versus float32, so the wrong convs grow); "
            f"set dyrep_metric: grad_norm or amp: none"
        )


def _global_batch_consistent(cfg: Config) -> None:
    """global_batch_size: micro_batch_size (given or its default) divides it; batch_size, if not its default 64,
    equals global_batch_size / the most workers; lr_scale_with_workers is off (the global batch does not scale)."""
    if cfg.global_batch_size is None:
        if cfg.micro_batch_size is not None or cfg.debug_sample_record:
            key = "micro_batch_size" if cfg.micro_batch_size is not None else "debug_sample_record"
            raise ConfigError(f"config key '{key}' applies only with global_batch_size; set global_batch_size "
                              f"(e.g. --set global_batch_size=64) or unset {key}")
        return
    glob = cfg.global_batch_size
    micro = cfg.micro_batch_size if cfg.micro_batch_size is not None else glob // math.gcd(glob, 8)
    if glob % micro:
        raise ConfigError(f"config keys 'global_batch_size' and 'micro_batch_size': {micro} does not divide {glob}; "
                          f"set micro_batch_size to a divisor of {glob} (e.g. {glob // math.gcd(glob, 8)})")
    per_worker = glob / cfg.max_workers
    if cfg.batch_size != DEFAULT_BATCH_SIZE and cfg.batch_size != per_worker:
        raise ConfigError(f"config keys 'batch_size' and 'global_batch_size' disagree: batch_size {cfg.batch_size} x "
                          f"{cfg.max_workers} worker(s) != global_batch_size {glob}; set only global_batch_size "
                          "(batch_size is then unused)")
    if cfg.lr_scale_with_workers:
        raise ConfigError("config keys 'global_batch_size' and 'lr_scale_with_workers': with a global batch the "
                          "step does not change with the worker count; set lr_scale_with_workers=false")


def _batch_sizes_bounded(cfg: Config) -> None:
    """batch_size and val_batch_size: at most MAX_BATCH_SIZE images per worker and step."""
    for key in ("batch_size", "val_batch_size"):
        value = getattr(cfg, key)
        if value is not None and value > MAX_BATCH_SIZE:
            raise ConfigError(f"config key {key!r} must be <= {MAX_BATCH_SIZE} images per worker and step, got "
                              f"{value}; e.g. {key}=64")


#: Rules over several keys, applied in order after every key passed its own rules.
CROSS_FIELD_RULES: tuple[Callable[[Config], None], ...] = (
    _data_dir_given,
    _parquet_train_given,
    _num_classes_match,
    _nesterov_needs_momentum,
    _dbb_is_not_dyrep,
    _metric_safe_under_amp,
    _synthetic_fits_memory,
    _global_batch_consistent,
    _batch_sizes_bounded,
)
