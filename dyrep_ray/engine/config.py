"""The validated training configuration of dyrep-ray (pure Python + PyYAML: no torch, no Ray).

One flat, frozen dataclass, :class:`TrainConfig`, holds every setting; its defaults are the built-in demo
experiment (``experiments/default.yaml`` spells them out). :func:`load_config` builds one from, in increasing
precedence::

    TrainConfig defaults  <  base (a dict, e.g. from a sweep)  <  YAML file  <  overrides ("key=value", --set)

Every value is checked when a :class:`TrainConfig` is created (also by :meth:`TrainConfig.replace` and direct
construction): unknown keys (with the closest valid key), types (ints are accepted for float fields, a bool is
never an int, ``None`` only for Optional fields), ranges, enumerations and a few cross-field rules. Every
problem raises :class:`ConfigError`, whose message is one line naming the key/file and the fix.

Two YAML formats are read:

* **dyrep-ray format** (``experiments/*.yaml``): keys are :class:`TrainConfig` field names.
* **original DyRep strategy files** (``configs/strategies/DyRep/*.yaml`` of hunto/image_classification_sota,
  the training code of hunto/DyRep), taken as they are. A file is read in the original format when it has the
  marker ``format: dyrep-original``, or -- without a marker -- when it contains at least one key that exists
  only in the original format (see :data:`ORIGINAL_ONLY_KEYS`: e.g. ``sgd_no_nesterov``, ``drop``,
  ``clip_grad_norm``, ``val_batch_size_multiplier``, or any key spelled with a hyphen such as
  ``drop-path-rate``). ``format: dyrep-ray`` forces the dyrep-ray format. Every original key is translated by
  :data:`ORIGINAL_KEY_MAP` (copied, renamed -- ``workers`` is DataLoader workers there, so it becomes
  ``num_data_workers`` -- negated, converted, ignored with a warning, or rejected when it would switch on a
  feature dyrep-ray does not implement). As the original's dataset builder did, ``dataset`` also fixes
  ``image_size`` (224 ImageNet, 32 CIFAR) and, without ``data_path``, sets ``data_dir`` to ``data/imagenet`` or
  ``data/cifar``. Other keys an original file leaves out keep the dyrep-ray defaults (the original argparse
  defaults are not applied; the shipped strategy files set every key whose default differs). The original
  passed the model and the GPU count on the command line: give them with
  ``--set model=resnet18 --set workers=8 --set use_gpu=true``.

Plain YAML 1.1 reads ``1e-4`` (no dot) as a string; float fields accept such strings, so ``lr: 1e-3`` works.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml
from ..errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "ConfigError",
    "DATASET_NUM_CLASSES",
    "FORMAT_KEY",
    "NATIVE_FORMAT",
    "ORIGINAL_FORMAT",
    "ORIGINAL_KEY_MAP",
    "ORIGINAL_ONLY_KEYS",
    "OriginalKey",
    "TrainConfig",
    "detect_format",
    "load_config",
    "parse_override",
    "translate_original",
]

FORMAT_KEY = "format"
NATIVE_FORMAT = "dyrep-ray"
ORIGINAL_FORMAT = "dyrep-original"

_MAX_REPR = 80


class ConfigError(UserError, ValueError):
    """An invalid configuration. ``str(err)`` is one line naming the key (or file) and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# ---------------------------------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------------------------------

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("synthetic", "cifar10", "cifar100", "imagenet", "parquet"),
    "opt": ("sgd", "adamw"),
    "sched": ("cosine", "step", "none"),
    "amp": ("none", "bf16", "fp16"),
    "dyrep_metric": ("synflow", "snip", "grad_norm", "random"),
    "on_nonfinite": ("skip", "stop", "ignore"),
    "remode": ("pixel", "const", "rand"),
    "interpolation": ("bilinear", "bicubic"),
}

#: Class counts of datasets whose label set is fixed (``num_classes`` must match when given).
DATASET_NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}

_DATASETS_WITH_DIR = ("cifar10", "cifar100", "imagenet")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a dyrep-ray run. Defaults = the built-in demo experiment (``experiments/default.yaml``).

    Frozen: derive variants with :meth:`replace`. Creating one validates every field (see module docstring).
    """

    # --- model & data ---
    model: str = "small_cnn"
    dataset: str = "synthetic"
    data_dir: Optional[str] = None  # root of CIFAR python-format dirs / ImageNet train+val folders
    num_classes: Optional[int] = None  # None = from the dataset
    image_size: int = 32
    synthetic_train_size: int = 2048
    synthetic_val_size: int = 512
    parquet_train: Optional[str] = None
    parquet_val: Optional[str] = None
    # --- schedule & batch ---
    epochs: int = 6
    batch_size: int = 64  # per Ray worker; total = batch_size * workers
    val_batch_size: Optional[int] = None  # per worker; None = batch_size
    # --- optimizer ---
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    opt_eps: float = 1e-8
    opt_betas: Optional[list[float]] = None  # AdamW betas; None = torch default
    opt_no_filter: bool = False  # False = bias/BN params excluded from weight decay
    # --- learning-rate schedule ---
    sched: str = "cosine"
    min_lr: float = 1e-5
    warmup_epochs: int = 0
    warmup_lr: float = 1e-4
    decay_epochs: float = 30
    decay_rate: float = 0.1
    decay_by_epoch: bool = True  # cosine: update the LR once per epoch (True) or every step (False)
    # --- training ---
    smoothing: float = 0.0
    seed: int = 42
    amp: str = "none"
    clip_grad: Optional[float] = None  # max global grad norm; None = no clipping
    channels_last: bool = True
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    drop_rate: float = 0.0  # classifier dropout (original `drop`); builders that lack it must reject > 0
    drop_path_rate: float = 0.0  # stochastic depth (original `drop-path-rate`); same rule
    # --- augmentation ---
    aa: Optional[str] = None  # timm auto-augment spec, e.g. "rand-m9-mstd0.5"
    reprob: float = 0.0
    remode: str = "pixel"
    color_jitter: float = 0.0
    cutout_length: int = 0  # CIFAR cutout side; 0 = off
    interpolation: str = "bilinear"
    image_mean: Optional[list[float]] = None  # None = the dataset's standard normalization
    image_std: Optional[list[float]] = None
    # --- DyRep ---
    dyrep: bool = True
    dyrep_adjust_interval: int = 1
    dyrep_max_adjust_epochs: int = 1000
    dyrep_recal_bn_iters: int = 20
    dyrep_recal_bn_every_epoch: bool = False
    dyrep_metric: str = "synflow"
    dyrep_grow_topk: int = 1
    dyrep_cut_threshold: float = 0.1
    dyrep_cut_std_gate: float = 0.02
    dyrep_init_gamma: float = 0.01
    dyrep_max_depth: int = 2
    # --- Ray / runtime ---
    workers: int = 2  # Ray Train workers (original DyRep `workers` = DataLoader workers -> num_data_workers)
    use_gpu: Optional[bool] = None  # None = use GPUs when the cluster has them
    num_data_workers: int = 0  # DataLoader worker processes per Ray worker
    log_interval: int = 50
    # --- checkpoints & fault tolerance ---
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    max_failures: int = 2  # -1 = retry forever
    storage_path: Optional[str] = None
    on_nonfinite: str = "skip"

    def __post_init__(self) -> None:
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, _check_value(name, getattr(self, name)))
        _check_cross_fields(self)

    # -- conversions ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields, in declaration order, as plain YAML/JSON-friendly values (lists are copies)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validated config from field names -> values; missing fields take their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of key: value pairs, got {type(data).__name__}")
        return cls(**_validated_items(data, source=None))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (unknown keys raise :class:`ConfigError`)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        """The config as a dyrep-ray format YAML document (loads back with :func:`load_config`)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = get_type_hints(TrainConfig)


# ---------------------------------------------------------------------------------------------------------------
# Value checks
# ---------------------------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _yaml_value(value: Any) -> str:
    """A value as it would be written after ``--set key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


# example values for error messages, where the default (None) would not show the expected form
_EXAMPLES: dict[str, Any] = {
    "data_dir": "data/cifar",
    "num_classes": 10,
    "parquet_train": "/data/train.parquet",
    "parquet_val": "/data/val.parquet",
    "val_batch_size": 128,
    "opt_betas": [0.9, 0.999],
    "clip_grad": 5.0,
    "aa": "rand-m9-mstd0.5",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "use_gpu": True,
    "storage_path": "/mnt/runs",
}


def _example(name: str) -> str:
    return f"{name}={_yaml_value(_EXAMPLES.get(name, _DEFAULTS[name]))}"


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _type_name(hint: Any) -> str:
    inner, optional = _split_optional(hint)
    if get_origin(inner) is list:
        text = f"a list of {get_args(inner)[0].__name__}"
    else:
        text = f"a {inner.__name__}" if inner is not int else "an int"
    return f"{text} or null" if optional else text


# YAML 1.1 (PyYAML) reads exponent floats without a dot ("1e-4") or without an exponent sign ("1.0e4") as str.
_EXP_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$")


def _coerce_scalar(value: Any, target: type) -> Any:
    """``value`` converted to ``target`` or raises ``TypeError`` (not ConfigError: the caller names the key)."""
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif target is float:
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            value = float(value.strip().replace("_", ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("must be finite")
            return float(value)
    elif target is str:
        if isinstance(value, str):
            return value
    raise TypeError


def _check_type(name: str, value: Any) -> Any:
    hint = _HINTS[name]
    inner, optional = _split_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(
            f"config key {name!r} expects {_type_name(hint)}, got null; set it, e.g. {_example(name)} (the default)"
        )
    try:
        if get_origin(inner) is list:
            elem = get_args(inner)[0]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce_scalar(v, elem) for v in value]
        return _coerce_scalar(value, inner)
    except ValueError:  # a non-finite float
        raise ConfigError(
            f"config key {name!r} expects finite numbers, got {_short(value)}; e.g. {_example(name)}"
        ) from None
    except TypeError:
        raise ConfigError(
            f"config key {name!r} expects {_type_name(hint)}, got {_short(value)} ({type(value).__name__}); "
            f"e.g. {_example(name)}"
        ) from None


def _ge(bound: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= bound), f">= {bound}"


def _gt(bound: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > bound), f"> {bound}"


def _in(lo: float, hi: float, hi_open: bool = True) -> tuple[Callable[[Any], bool], str]:
    if hi_open:
        return (lambda v: lo <= v < hi), f"in [{lo}, {hi})"
    return (lambda v: lo <= v <= hi), f"in [{lo}, {hi}]"


# Range rules per field (checked on non-None values; list fields are checked element-wise and by length).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": _ge(1),
    "image_size": _ge(1),
    "synthetic_train_size": _ge(1),
    "synthetic_val_size": _ge(1),
    "epochs": _ge(1),
    "batch_size": _ge(1),
    "val_batch_size": _ge(1),
    "lr": _gt(0),
    "momentum": _in(0, 1),
    "weight_decay": _ge(0),
    "opt_eps": _gt(0),
    "min_lr": _ge(0),
    "warmup_epochs": _ge(0),
    "warmup_lr": _ge(0),
    "decay_epochs": _gt(0),
    "decay_rate": _gt(0),
    "smoothing": _in(0, 1),
    "seed": _ge(0),
    "clip_grad": _gt(0),
    "model_ema_decay": _in(0, 1),
    "drop_rate": _in(0, 1),
    "drop_path_rate": _in(0, 1),
    "reprob": _in(0, 1, hi_open=False),
    "color_jitter": _ge(0),
    "cutout_length": _ge(0),
    "dyrep_adjust_interval": _ge(1),
    "dyrep_max_adjust_epochs": _ge(0),
    "dyrep_recal_bn_iters": _ge(0),
    "dyrep_grow_topk": _ge(0),
    "dyrep_cut_threshold": _ge(0),
    "dyrep_cut_std_gate": _ge(0),
    "dyrep_init_gamma": _gt(0),
    "dyrep_max_depth": _ge(1),
    "workers": _ge(1),
    "num_data_workers": _ge(0),
    "log_interval": _ge(1),
    "checkpoint_every": _ge(1),
    "keep_checkpoints": _ge(1),
    "max_failures": _ge(-1),
}

# list fields: (required length, element rule)
_LIST_RULES: dict[str, tuple[int, tuple[Callable[[Any], bool], str]]] = {
    "opt_betas": (2, _in(0, 1)),
    "image_mean": (3, (lambda v: True, "any")),
    "image_std": (3, _gt(0)),
}

_NON_EMPTY_STR = ("model", "data_dir", "parquet_train", "parquet_val", "storage_path", "aa")


def _check_value(name: str, value: Any) -> Any:
    """Type-checked, normalized value of field ``name`` (per-field rules only); raises ConfigError."""
    value = _check_type(name, value)
    if value is None:
        return None
    if name in CHOICES:
        normalized = value.strip().lower()
        valid = CHOICES[name]
        if normalized not in valid:
            close = difflib.get_close_matches(normalized, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"config key {name!r} must be one of {', '.join(valid)}; got {_short(value)}{hint}; "
                f"e.g. {_example(name)}"
            )
        return normalized
    if name in _NON_EMPTY_STR and not value.strip():
        null_ok = " or null" if _split_optional(_HINTS[name])[1] else ""
        raise ConfigError(f"config key {name!r} must be a non-empty string{null_ok}, got {value!r}")
    if name in _LIST_RULES:
        length, (ok, text) = _LIST_RULES[name]
        if len(value) != length:
            raise ConfigError(
                f"config key {name!r} needs exactly {length} numbers, got {len(value)}: {_short(value)}; "
                f"e.g. {_example(name)} or null"
            )
        bad = [v for v in value if not ok(v)]
        if bad:
            raise ConfigError(f"config key {name!r}: every value must be {text}, got {_short(value)}")
        return value
    if name in _RANGES:
        ok, text = _RANGES[name]
        if not ok(value):
            raise ConfigError(f"config key {name!r} must be {text}, got {_short(value)}; e.g. {_example(name)}")
    return value


def _check_cross_fields(cfg: TrainConfig) -> None:
    if cfg.dataset in _DATASETS_WITH_DIR and cfg.data_dir is None:
        place = {
            "cifar10": "the directory holding cifar-10-batches-py",
            "cifar100": "the directory holding cifar-100-python",
        }.get(cfg.dataset, "the ImageNet root holding train/ and val/")
        raise ConfigError(
            f"dataset {cfg.dataset!r} needs data_dir, {place}; e.g. --set data_dir=/path/to/data, "
            f"or dataset=synthetic to run without files"
        )
    if cfg.dataset == "parquet" and cfg.parquet_train is None:
        raise ConfigError(
            "dataset 'parquet' needs parquet_train (a Parquet file/dir or URI with image and label columns); "
            "e.g. --set parquet_train=/data/train.parquet"
        )
    expected = DATASET_NUM_CLASSES.get(cfg.dataset)
    if expected is not None and cfg.num_classes is not None and cfg.num_classes != expected:
        raise ConfigError(
            f"config key 'num_classes' is {cfg.num_classes} but dataset {cfg.dataset!r} has {expected} classes; "
            f"set num_classes=null (from the dataset) or num_classes={expected}"
        )
    if cfg.opt == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(
            "config keys 'nesterov' and 'momentum': Nesterov SGD needs momentum > 0; "
            "set nesterov=false or e.g. momentum=0.9"
        )


def _unknown_key_message(
    key: Any,
    valid: Sequence[str],
    kind: str = "config key",
    listing: str = "valid keys are the TrainConfig fields (see experiments/default.yaml)",
) -> str:
    if not isinstance(key, str):
        extra = " (an unquoted YAML boolean: quote the key)" if isinstance(key, bool) else ""
        return f"{kind} {key!r} is not a string{extra}; keys are names such as 'lr'"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if not close and "-" in key and key.replace("-", "_") in valid:
        close = [key.replace("-", "_")]
    if close:
        return f"unknown {kind} {key!r} (did you mean {close[0]!r}?)"
    return f"unknown {kind} {key!r}; {listing}"


def _validated_items(data: Mapping[str, Any], source: Optional[str]) -> dict[str, Any]:
    """Keys checked against the fields and each value checked on its own; errors are prefixed by ``source``."""
    prefix = f"{source}: " if source else ""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _DEFAULTS:
            message = _unknown_key_message(key, _FIELD_NAMES)
            hint = _original_key_hint(key)
            raise ConfigError(prefix + message + (f"; {hint}" if hint else ""))
        try:
            out[key] = _check_value(key, value)
        except ConfigError as exc:
            raise ConfigError(prefix + str(exc)) from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Original DyRep strategy files (hunto/image_classification_sota, lib/utils/args.py + configs/strategies/DyRep)
# ---------------------------------------------------------------------------------------------------------------


class OriginalKey(NamedTuple):
    """How one key of an original DyRep strategy file (hyphens read as underscores) becomes dyrep-ray config.

    ``action``:
      * ``"copy"``    -- the value goes to ``field`` unchanged (``null`` into a non-Optional field keeps the
        dyrep-ray default, as the original's ``None`` meant "unset");
      * ``"negate"``  -- ``field = not value`` (a bool);
      * ``"convert"`` -- translated by dedicated code (model names, AMP flag, gradient clipping pair,
        validation batch multiplier);
      * ``"ignore"``  -- accepted and dropped with one warning (launcher/bookkeeping keys with no effect);
      * ``"off-only"`` -- accepted (and dropped) only with one of the ``neutral`` values that switch the
        original feature off; any other value raises ConfigError (dyrep-ray does not implement it).
    """

    field: Optional[str]
    action: str
    note: str = ""
    neutral: tuple[Any, ...] = ()


_OFF_STR = ("", None)

#: Every key of the original training code (argparse dests + keys seen in its strategy files) -> translation.
ORIGINAL_KEY_MAP: dict[str, OriginalKey] = {
    # dataset / model
    "dataset": OriginalKey("dataset", "copy", "also fixes image_size (224 imagenet, 32 cifar) as the original did"),
    "data_path": OriginalKey("data_dir", "convert", "'' -> data/imagenet or data/cifar, as the original did"),
    "model": OriginalKey("model", "convert", "timm_<name> -> timm/<name>; nas_model needs model_config"),
    "model_config": OriginalKey("model", "convert", "configs/models/VGG/vgg16_cifar10|100.yaml -> vgg16_cifar"),
    "batch_size": OriginalKey("batch_size", "copy", "per GPU there, per Ray worker here"),
    "val_batch_size_multiplier": OriginalKey("val_batch_size", "convert", "val_batch_size = batch_size * m"),
    "smoothing": OriginalKey("smoothing", "copy"),
    # optimizer
    "opt": OriginalKey("opt", "copy"),
    "opt_eps": OriginalKey("opt_eps", "copy"),
    "opt_betas": OriginalKey("opt_betas", "copy"),
    "opt_no_filter": OriginalKey("opt_no_filter", "copy"),
    "momentum": OriginalKey("momentum", "copy"),
    "sgd_no_nesterov": OriginalKey("nesterov", "negate"),
    "weight_decay": OriginalKey("weight_decay", "copy"),
    "clip_grad_norm": OriginalKey("clip_grad", "convert", "true -> clip_grad = clip_grad_max_norm"),
    "clip_grad_max_norm": OriginalKey("clip_grad", "convert", "used only with clip_grad_norm: true"),
    "amp": OriginalKey("amp", "convert", "true -> 'fp16' (torch.cuda.amp), false -> 'none'"),
    # LR schedule
    "sched": OriginalKey("sched", "copy"),
    "lr": OriginalKey("lr", "copy"),
    "warmup_lr": OriginalKey("warmup_lr", "copy"),
    "min_lr": OriginalKey("min_lr", "copy"),
    "epochs": OriginalKey("epochs", "copy"),
    "warmup_epochs": OriginalKey("warmup_epochs", "copy"),
    "decay_epochs": OriginalKey("decay_epochs", "copy"),
    "decay_rate": OriginalKey("decay_rate", "copy"),
    "decay_by_epoch": OriginalKey("decay_by_epoch", "copy"),
    # augmentation & regularization
    "image_mean": OriginalKey("image_mean", "copy"),
    "image_std": OriginalKey("image_std", "copy"),
    "interpolation": OriginalKey("interpolation", "copy"),
    "color_jitter": OriginalKey("color_jitter", "copy"),
    "cutout_length": OriginalKey("cutout_length", "copy"),
    "aa": OriginalKey("aa", "copy"),
    "reprob": OriginalKey("reprob", "copy"),
    "remode": OriginalKey("remode", "copy"),
    "drop": OriginalKey("drop_rate", "copy"),
    "drop_path_rate": OriginalKey("drop_path_rate", "copy"),
    "drop_path_strategy": OriginalKey(
        None, "off-only", "a linearly growing drop-path rate is not implemented", ("const", None)
    ),
    "mixup": OriginalKey(None, "off-only", "mixup is not implemented", (0, 0.0, None)),
    "cutmix": OriginalKey(None, "off-only", "cutmix is not implemented", (0, 0.0, None)),
    "cutmix_minmax": OriginalKey(None, "off-only", "cutmix is not implemented", (None,)),
    "mixup_prob": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "mixup_switch_prob": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "mixup_mode": OriginalKey(None, "ignore", "only used with mixup/cutmix"),
    "model_ema": OriginalKey("model_ema", "copy"),
    "model_ema_decay": OriginalKey("model_ema_decay", "copy"),
    "auxiliary": OriginalKey(None, "off-only", "auxiliary towers (NAS models) are not implemented", (False, None)),
    "auxiliary_weight": OriginalKey(None, "ignore", "only used with auxiliary towers"),
    # misc / launcher
    "seed": OriginalKey("seed", "copy"),
    "log_interval": OriginalKey("log_interval", "copy"),
    "workers": OriginalKey("num_data_workers", "copy", "DataLoader workers there; Ray workers are `workers` here"),
    "experiment": OriginalKey(None, "ignore", "run name: dyrep-ray names runs on the command line / storage_path"),
    "resume": OriginalKey(None, "off-only", "resume by re-running with the same storage_path and name", _OFF_STR),
    "slurm": OriginalKey(None, "ignore", "launcher flag: dyrep-ray runs on Ray"),
    "local_rank": OriginalKey(None, "ignore", "set by the launcher; Ray assigns ranks"),
    "dist_port": OriginalKey(None, "ignore", "set by the launcher; Ray sets up the process group"),
    "config": OriginalKey(None, "ignore", "the -c flag of the original command line"),
    # knowledge distillation (later versions of the original code)
    "kd": OriginalKey(None, "off-only", "knowledge distillation is not implemented", _OFF_STR),
    "teacher_model": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_pretrained": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_ckpt": OriginalKey(None, "ignore", "only used with kd"),
    "kd_loss_weight": OriginalKey(None, "ignore", "only used with kd"),
    "ori_loss_weight": OriginalKey(None, "ignore", "only used with kd"),
    "teacher_module": OriginalKey(None, "ignore", "only used with kd"),
    "student_module": OriginalKey(None, "ignore", "only used with kd"),
    "kd_loss_kwargs": OriginalKey(None, "ignore", "only used with kd"),
    # structural re-parameterization
    "dbb": OriginalKey(
        None, "off-only", "static DBB (every conv re-parameterized) is not offered; DyRep grows DBBs", (False, None)
    ),
    "dyrep": OriginalKey("dyrep", "copy"),
    "dyrep_adjust_interval": OriginalKey("dyrep_adjust_interval", "copy"),
    "dyrep_max_adjust_epochs": OriginalKey("dyrep_max_adjust_epochs", "copy"),
    "dyrep_recal_bn_iters": OriginalKey("dyrep_recal_bn_iters", "copy"),
    "dyrep_recal_bn_every_epoch": OriginalKey("dyrep_recal_bn_every_epoch", "copy"),
    "edgenn_config": OriginalKey(None, "off-only", "EdgeNN models are not implemented", _OFF_STR),
}

#: Keys that mark a file without a ``format:`` marker as an original DyRep strategy file (together with any
#: hyphenated key): original keys that are not dyrep-ray field names.
ORIGINAL_ONLY_KEYS: frozenset[str] = frozenset(k for k in ORIGINAL_KEY_MAP if k not in _DEFAULTS)

# what the original's lib/dataset/builder.py fixes per dataset (data_path '' -> these, input_shape)
_ORIGINAL_DATA_DIRS = {"imagenet": "data/imagenet", "cifar10": "data/cifar", "cifar100": "data/cifar"}
_ORIGINAL_IMAGE_SIZES = {"imagenet": 224, "cifar10": 32, "cifar100": 32}

_VGG_CIFAR_CONFIG = re.compile(r"vgg16_cifar(10|100)?\.ya?ml$", re.IGNORECASE)


def _original_key_hint(key: Any) -> str:
    """For a dyrep-ray key error: how to write an original DyRep key in dyrep-ray form."""
    if not isinstance(key, str):
        return ""
    entry = ORIGINAL_KEY_MAP.get(key.replace("-", "_"))
    if entry is None or key in _DEFAULTS:
        return ""
    if entry.action == "negate":
        return f"{key!r} is an original DyRep key: write {entry.field}=false instead"
    if entry.field is not None:
        return f"{key!r} is an original DyRep key: write {entry.field!r} in dyrep-ray configs"
    return f"{key!r} is an original DyRep key that dyrep-ray does not use ({entry.note})"


def detect_format(raw: Mapping[Any, Any]) -> tuple[str, str]:
    """``(NATIVE_FORMAT | ORIGINAL_FORMAT, reason)`` of a parsed YAML mapping (see module docstring)."""
    if FORMAT_KEY in raw:
        marker = raw[FORMAT_KEY]
        if marker not in (NATIVE_FORMAT, ORIGINAL_FORMAT):
            raise ConfigError(
                f"config key 'format' must be {NATIVE_FORMAT!r} or {ORIGINAL_FORMAT!r}, got {_short(marker)}; "
                f"remove it to detect the format automatically"
            )
        return marker, f"marker format: {marker}"
    for key in raw:
        if isinstance(key, str) and (key in ORIGINAL_ONLY_KEYS or "-" in key):
            return ORIGINAL_FORMAT, f"it contains the original-only key {key!r}"
    return NATIVE_FORMAT, "no original-only keys"


def _neutral_text(value: Any) -> str:
    return "an empty string" if value == "" else _yaml_value(value)


def _model_from_original(model: Any, model_config: Any, source: str) -> Optional[str]:
    if model_config not in (None, "") and not isinstance(model_config, str):
        raise ConfigError(f"{source}: original key 'model_config' expects a path string, got {_short(model_config)}")
    if model is None and model_config in (None, ""):
        return None
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"{source}: original key 'model' expects a string, got {_short(model)}")
    if model in (None, "nas_model"):
        if model_config and _VGG_CIFAR_CONFIG.search(model_config):
            return "vgg16_cifar"
        raise ConfigError(
            f"{source}: original model 'nas_model' with model_config {_short(model_config)} is not supported "
            f"by dyrep-ray (only configs/models/VGG/vgg16_cifar10|100.yaml); set --set model=<name>, "
            f"e.g. model=vgg16_cifar"
        )
    if model.startswith("timm_"):
        return "timm/" + model[len("timm_"):]
    return model


def translate_original(raw: Mapping[Any, Any], source: str = "original DyRep strategy file") -> dict[str, Any]:
    """Values (dyrep-ray field names, each checked) that an original DyRep strategy mapping stands for.

    Raises ConfigError for unknown keys, bad values and original features dyrep-ray does not implement;
    logs one warning listing ignored keys.
    """
    normalized: dict[str, Any] = {}
    for key, value in raw.items():
        if key == FORMAT_KEY:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"{source}: {_unknown_key_message(key, list(ORIGINAL_KEY_MAP), 'original DyRep key')}")
        name = key.replace("-", "_")
        if name not in ORIGINAL_KEY_MAP:
            message = _unknown_key_message(
                name, list(ORIGINAL_KEY_MAP), "original DyRep key", "valid keys are those of ORIGINAL_KEY_MAP"
            )
            if name in _DEFAULTS:
                message += (
                    f"; {name!r} is a dyrep-ray key: in an original strategy file give it with --set {name}=..., "
                    f"or write the whole file in dyrep-ray form"
                )
            raise ConfigError(f"{source}: {message}")
        if name in normalized and normalized[name] != value:
            raise ConfigError(
                f"{source}: original key {name!r} is given twice (with '-' and '_') with different values "
                f"{_short(normalized[name])} and {_short(value)}; keep one"
            )
        normalized[name] = value

    out: dict[str, Any] = {}
    ignored: list[str] = []

    def put(field: str, value: Any, original: str) -> None:
        try:
            out[field] = _check_value(field, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: original key {original!r} (-> {field!r}): {exc}") from None

    for name, value in normalized.items():
        entry = ORIGINAL_KEY_MAP[name]
        if entry.action == "copy":
            assert entry.field is not None
            if value is None and not _split_optional(_HINTS[entry.field])[1]:
                logger.debug("original key %r is null: keeping the dyrep-ray default of %r", name, entry.field)
                continue
            put(entry.field, value, name)
        elif entry.action == "negate":
            assert entry.field is not None
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{source}: original key {name!r} expects true or false, got {_short(value)} "
                    f"({type(value).__name__})"
                )
            put(entry.field, not value, name)
        elif entry.action == "ignore":
            ignored.append(f"{name} ({entry.note})")
        elif entry.action == "off-only":
            if value not in entry.neutral:
                raise ConfigError(
                    f"{source}: original DyRep key {name!r}={_short(value)} is not supported by dyrep-ray "
                    f"({entry.note}); remove the key or set it to {_neutral_text(entry.neutral[0])}"
                )
        # "convert" keys are handled below

    # model / model_config
    model = _model_from_original(normalized.get("model"), normalized.get("model_config"), source)
    if model is not None:
        put("model", model, "model")
    # dataset location and input size, fixed by the original's dataset builder
    dataset = out.get("dataset")
    data_path = normalized.get("data_path")
    if data_path not in (None, ""):
        put("data_dir", data_path, "data_path")
    elif dataset in _ORIGINAL_DATA_DIRS:
        out["data_dir"] = _ORIGINAL_DATA_DIRS[dataset]
    if dataset in _ORIGINAL_IMAGE_SIZES:
        out["image_size"] = _ORIGINAL_IMAGE_SIZES[dataset]
    # automatic mixed precision flag
    if "amp" in normalized:
        amp = normalized["amp"]
        if amp is None:
            pass
        elif isinstance(amp, bool):
            put("amp", "fp16" if amp else "none", "amp")
        else:  # a dyrep-ray style string is tolerated
            put("amp", amp, "amp")
    # gradient clipping: --clip-grad-norm (flag) + --clip-grad-max-norm (default 5.0)
    if "clip_grad_norm" in normalized or "clip_grad_max_norm" in normalized:
        enabled = normalized.get("clip_grad_norm", False)
        if not isinstance(enabled, bool):
            raise ConfigError(
                f"{source}: original key 'clip_grad_norm' expects true or false, got {_short(enabled)}"
            )
        if enabled:
            put("clip_grad", normalized.get("clip_grad_max_norm", 5.0), "clip_grad_max_norm")
        else:
            out["clip_grad"] = None
            if "clip_grad_max_norm" in normalized:
                ignored.append("clip_grad_max_norm (clip_grad_norm is off)")
    # validation batch size = batch_size * multiplier
    multiplier = normalized.get("val_batch_size_multiplier")
    if multiplier is not None:
        try:
            multiplier = _coerce_scalar(multiplier, float)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: original key 'val_batch_size_multiplier' expects a number, got {_short(multiplier)}"
            ) from None
        if multiplier <= 0:
            raise ConfigError(
                f"{source}: original key 'val_batch_size_multiplier' must be > 0, got {multiplier}"
            )
        if multiplier != 1.0:
            batch = out.get("batch_size", _DEFAULTS["batch_size"])
            put("val_batch_size", max(1, int(batch * multiplier)), "val_batch_size_multiplier")

    if ignored:
        logger.warning("%s: ignoring original DyRep keys with no effect in dyrep-ray: %s", source, "; ".join(ignored))
    if "num_data_workers" in out:
        logger.info(
            "%s: original 'workers: %s' means DataLoader workers -> num_data_workers=%s; the number of Ray "
            "workers (GPUs) is `workers` -- e.g. --set workers=8 for the original 8-GPU runs",
            source, normalized.get("workers"), out["num_data_workers"],
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# YAML files, overrides, loading
# ---------------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "syntax error"
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{problem}{where}"
    return str(exc)


def _read_yaml_file(path: Union[str, os.PathLike]) -> dict[Any, Any]:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {name!r} does not exist; pass the path of a YAML file, e.g. experiments/default.yaml"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name!r} is a directory; pass the path of a YAML file inside it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {name!r} is not UTF-8 text; pass a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name!r}: {exc.strerror or exc}; check the path") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name!r} is not valid YAML: {_yaml_problem(exc)}; fix the syntax") from None
    if not isinstance(data, dict):
        got = "nothing (the file is empty)" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"config file {name!r} must contain a mapping of key: value pairs (e.g. 'lr: 0.1'), got {got}"
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is parsed with ``yaml.safe_load`` (``"a="`` gives None).

    Only the syntax is checked here; :func:`load_config` checks the key and value.
    """
    if not isinstance(text, str):
        raise ConfigError(f"an override must be a 'key=value' string, got {_short(text)}")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. lr=0.1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)}); quote it, e.g. {key}='...'"
        ) from None
    return key, value


def load_config(
    path: Union[str, os.PathLike, None] = None,
    overrides: Sequence[str] = (),
    *,
    base: Optional[Mapping[str, Any]] = None,
) -> TrainConfig:
    """The validated config: defaults < ``base`` < YAML file ``path`` (either format) < ``overrides``.

    ``overrides`` are ``"key=value"`` strings with dyrep-ray field names (the CLI's ``--set``); later ones win.
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the single string {overrides!r}")
    values: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, Mapping):
            raise ConfigError(f"base config must be a mapping of key: value pairs, got {type(base).__name__}")
        values.update(_validated_items(base, source="base config"))
    original = False
    if path is not None:
        name = os.fspath(path)
        raw = _read_yaml_file(name)
        fmt, reason = detect_format(raw)
        if fmt == ORIGINAL_FORMAT:
            original = True
            logger.info("reading %s as an original DyRep strategy file (%s)", name, reason)
            from_file = translate_original(raw, source=f"config file {name!r}")
        else:
            body = {k: v for k, v in raw.items() if k != FORMAT_KEY}
            from_file = _validated_items(body, source=f"config file {name!r}")
        values.update(from_file)
    for text in overrides:
        key, value = parse_override(text)
        values.update(_validated_items({key: value}, source=f"--set {text!r}"))
    if original and "model" not in values:
        logger.warning(
            "%s names no model (the original passed it on the command line); using model=%r -- "
            "pass e.g. --set model=resnet18",
            os.fspath(path), _DEFAULTS["model"],  # type: ignore[arg-type]
        )
    return TrainConfig.from_dict(values)
