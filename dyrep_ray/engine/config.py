"""The validated training configuration of dyrep-ray (pure Python + PyYAML: no torch, no Ray).

One flat, frozen dataclass, :class:`TrainConfig`, holds every setting; its defaults are the built-in demo
experiment (``experiments/default.yaml`` spells them out). :func:`load_config` builds one from, in increasing
precedence::

    TrainConfig defaults  <  base (a dict, e.g. from a sweep)  <  YAML file  <  overrides ("key=value", --set)

Every rule of a key is declared next to it, with :func:`option` (``field(metadata=...)``): its bounds, example
value for messages, whether it must be a non-empty string, and its resume policy (``resume="refuse"`` for a
structural key that cannot change when a run resumes, see :func:`resume_changes`). Enum-like keys are typed
with a :class:`ConfigEnum` (a ``str`` Enum: equal to its string, written as a plain string to JSON/YAML).
Adding a key is one declaration in :class:`TrainConfig` (plus its line in ``experiments/default.yaml``, which
lists every key). Only rules that involve several keys live apart, in :data:`CROSS_FIELD_RULES`.

Every value is checked when a :class:`TrainConfig` is created (also by :meth:`TrainConfig.replace` and direct
construction): unknown keys (with the closest valid key), types (ints are accepted for float fields, a bool is
never an int, ``None`` only for Optional fields), ranges, enumerations and the cross-field rules. Every
problem raises :class:`ConfigError`, whose message is one line naming the key/file and the fix.

Two YAML formats are read:

* **dyrep-ray format** (``experiments/*.yaml``): keys are :class:`TrainConfig` field names.
* **original DyRep strategy files** (``configs/strategies/DyRep/*.yaml`` of hunto/image_classification_sota):
  translated by :mod:`dyrep_ray.engine.original_format` (see there for the detection rule and key map).

Plain YAML 1.1 reads ``1e-4`` (no dot) as a string; float fields accept such strings, so ``lr: 1e-3`` works.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import logging
import math
import os
import re
import reprlib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "ConfigChange",
    "ConfigEnum",
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
    "option",
    "parse_override",
    "resume_changes",
    "translate_original",
]

FORMAT_KEY = "format"
NATIVE_FORMAT = "dyrep-ray"
ORIGINAL_FORMAT = "dyrep-original"

_MAX_REPR = 80
# reprlib limits for values quoted in messages: a few hundred bytes of nested YAML aliases expand to an
# exponentially large value, so only a bounded prefix of it is ever visited
_REPR_LEVELS = 3
_REPR_ITEMS = 6


class ConfigError(UserError, ValueError):
    """An invalid configuration. ``str(err)`` is one line naming the key (or file) and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# ---------------------------------------------------------------------------------------------------------------
# The declaration mechanism: option() + field metadata, shared by tune/spec.py
# ---------------------------------------------------------------------------------------------------------------


class ConfigEnum(enum.StrEnum):
    """An enum-like config value: a ``str`` (``Opt.SGD == "sgd"``), printed and serialized as its value."""

    def __repr__(self) -> str:
        return repr(self.value)


RESUME_REFUSE = "refuse"
RESUME_ALLOW = "allow"
_RESUME_POLICIES = (RESUME_REFUSE, RESUME_ALLOW)


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a value (or of every element of a list value)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __bool__(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def holds(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ``in (0, 0.5]`` ..."""
        low, low_open = (self.gt, True) if self.gt is not None else (self.ge, False)
        high, high_open = (self.lt, True) if self.lt is not None else (self.le, False)
        if low is not None and high is not None:
            return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
        if low is not None:
            return f"{'>' if low_open else '>='} {_num(low)}"
        if high is not None:
            return f"{'<' if high_open else '<='} {_num(high)}"
        return "any"


@dataclass(frozen=True)
class Rule:
    """The per-key rules :func:`option` stores in a field's metadata (under :data:`RULE_KEY`)."""

    bounds: Bounds = Bounds()
    length: int | None = None  # list keys: required number of elements (bounds apply to each element)
    non_empty: bool = False  # str keys: must not be blank
    example: Any = None  # a value for messages where the default (None) would not show the expected form
    resume: str = RESUME_ALLOW  # "refuse": a structural key that cannot change when a run resumes
    must: str | None = None  # overrides the generated description in messages ("two positive numbers")
    check: Callable[[str, Any], Any] | None = None  # a custom check replacing the generic type check
    type_text: str | None = None  # the expected type in messages, for keys with a custom check
    doc: str = ""


RULE_KEY = "dyrep_ray.rule"


def option(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
    non_empty: bool = False,
    example: Any = None,
    resume: str = RESUME_ALLOW,
    must: str | None = None,
    check: Callable[[str, Any], Any] | None = None,
    type_text: str | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field whose validation rules are declared with it (read back by :func:`field_rule`)."""
    if resume not in _RESUME_POLICIES:
        raise ValueError(f"resume must be one of {_RESUME_POLICIES}, got {resume!r}")
    rule = Rule(Bounds(ge, gt, le, lt), length, non_empty, example, resume, must, check, type_text, doc)
    return dataclasses.field(default=default, metadata={RULE_KEY: rule})


def field_rule(f: dataclasses.Field) -> Rule:
    return f.metadata.get(RULE_KEY, Rule())


def _short(value: Any) -> str:
    """A bounded repr for messages (bounded work too: see _REPR_LEVELS)."""
    shortener = reprlib.Repr()
    shortener.maxlevel = _REPR_LEVELS
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = _REPR_ITEMS
    shortener.maxstring = shortener.maxother = shortener.maxlong = _MAX_REPR
    text = shortener.repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


short_repr = _short


def _yaml_value(value: Any) -> str:
    """A value as it would be written after ``--set key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _plain(value: Any) -> Any:
    """A validated value as a plain JSON/YAML value (enums -> their string, lists copied)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _type_name(hint: Any, rule: Rule = Rule()) -> str:
    inner, optional = _split_optional(hint)
    if rule.type_text:
        text = rule.type_text
    elif get_origin(inner) is list:
        text = f"a list of {get_args(inner)[0].__name__}"
    elif _is_enum(inner):
        text = "a str"
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
    elif target is str or _is_enum(target):
        if isinstance(value, str):
            return value
    elif target is Any:
        return value
    raise TypeError


class FieldProblem(Exception):
    """One value breaking one rule; each user formats it its own way (config keys, sweep file keys)."""

    def __init__(self, kind: str, value: Any, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind  # "null" | "finite" | "type" | "choice" | "empty" | "length" | "elements" | "range"
        self.value = value
        self.detail = detail  # choice: the closest choice; range/elements: the rule text


def check_field(hint: Any, rule: Rule, value: Any) -> Any:
    """The normalized ``value`` of a field declared with ``hint`` and ``rule``; raises :class:`FieldProblem`.

    Enum values are matched case-insensitively and returned as the enum member.
    """
    inner, optional = _split_optional(hint)
    if inner is Any:
        return value
    if value is None:
        if optional:
            return None
        raise FieldProblem("null", value)
    try:
        if get_origin(inner) is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = [_coerce_scalar(v, get_args(inner)[0]) for v in value]
        else:
            value = _coerce_scalar(value, inner)
    except ValueError:  # a non-finite float
        raise FieldProblem("finite", value) from None
    except TypeError:
        raise FieldProblem("type", value) from None
    if _is_enum(inner):
        normalized = value.strip().lower()
        try:
            return inner(normalized)
        except ValueError:
            valid = [m.value for m in inner]
            close = difflib.get_close_matches(normalized, valid, n=1, cutoff=0.5)
            raise FieldProblem("choice", value, close[0] if close else "") from None
    if rule.non_empty and isinstance(value, str) and not value.strip():
        raise FieldProblem("empty", value)
    if isinstance(value, list):
        if rule.length is not None and len(value) != rule.length:
            raise FieldProblem("length", value)
        if rule.bounds and not all(rule.bounds.holds(v) for v in value):
            raise FieldProblem("elements", value, rule.bounds.text())
        return value
    if rule.bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not rule.bounds.holds(value):
            raise FieldProblem("range", value, rule.bounds.text())
    return value


# ---------------------------------------------------------------------------------------------------------------
# Enum-like values
# ---------------------------------------------------------------------------------------------------------------


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

_DATASETS_WITH_DIR = ("cifar10", "cifar100", "imagenet")
#: Metrics whose value under autocast is eps-scale noise for a conv followed by train-mode BN (sign flips).
AMP_UNSAFE_METRICS = (DyRepMetric.SYNFLOW, DyRepMetric.SNIP)

_ELASTIC_LEN = 2
# Caps on what a few bytes of config could make the trainer allocate (issue 17, item 8).
from ..limits import MAX_NUM_CLASSES  # noqa: E402, I001  (also caps a checkpoint's num_classes in export.convert)
MAX_IMAGE_SIZE = 4096  # one 4096^2 RGB float32 image is 200 MB; 20000^2 would be 4.8 GB per image
MAX_SYNTHETIC_SIZE = 10_000_000  # images per synthetic split; what they occupy is capped by the next one
MAX_SYNTHETIC_BYTES = 8 * 2**30  # the synthetic splits live in memory: uint8 pixels + normalized float32 copy
_SYNTHETIC_BYTES_PER_VALUE = 1 + 4


def _check_workers(name: str, value: Any) -> Any:
    """``workers``: a fixed count (int >= 1) or an elastic range ``[min, max]`` with 1 <= min <= max."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise FieldProblem("range", value, ">= 1")
        return value
    if (isinstance(value, (list, tuple)) and len(value) == _ELASTIC_LEN
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        low, high = value
        if low < 1 or low > high:
            raise ConfigError(
                f"config key {name!r} as an elastic range [min, max] needs 1 <= min <= max, got {_short(value)}; "
                f"e.g. {name}=[2,4]"
            )
        return [low, high]
    raise FieldProblem("type", value)


# ---------------------------------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------------------------------

_REFUSE = RESUME_REFUSE


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a dyrep-ray run. Defaults = the built-in demo experiment (``experiments/default.yaml``).

    Frozen: derive variants with :meth:`replace`. Creating one validates every field (see module docstring).
    Keys marked ``resume=_REFUSE`` change what is trained: a resumed run refuses a change of them.
    """

    # --- model & data ---
    model: str = option("small_cnn", non_empty=True, resume=_REFUSE)
    dataset: Dataset = option(Dataset.SYNTHETIC, resume=_REFUSE)
    # root of CIFAR python-format dirs / ImageNet train+val folders; may move between resumes (same data)
    data_dir: str | None = option(None, non_empty=True, example="data/cifar")
    num_classes: int | None = option(None, ge=1, le=MAX_NUM_CLASSES, example=10,
                                        resume=_REFUSE)  # None = from the dataset
    image_size: int = option(32, ge=1, le=MAX_IMAGE_SIZE, resume=_REFUSE)
    synthetic_train_size: int = option(2048, ge=1, le=MAX_SYNTHETIC_SIZE)
    synthetic_val_size: int = option(512, ge=1, le=MAX_SYNTHETIC_SIZE)
    parquet_train: str | None = option(None, non_empty=True, example="/data/train.parquet")
    parquet_val: str | None = option(None, non_empty=True, example="/data/val.parquet")
    # --- schedule & batch ---
    epochs: int = option(6, ge=1)
    batch_size: int = option(64, ge=1)  # per Ray worker; total = batch_size * workers
    val_batch_size: int | None = option(None, ge=1, example=128)  # per worker; None = batch_size
    # --- optimizer ---
    opt: Opt = option(Opt.SGD, resume=_REFUSE)  # the saved optimizer state is per optimizer type
    lr: float = option(0.05, gt=0)
    momentum: float = option(0.9, ge=0, lt=1)
    nesterov: bool = option(True)
    weight_decay: float = option(5e-4, ge=0)
    opt_eps: float = option(1e-8, gt=0)
    opt_betas: list[float] | None = option(None, length=2, ge=0, lt=1, example=[0.9, 0.999])  # None = torch's
    opt_no_filter: bool = option(False)  # False = bias/BN params excluded from weight decay
    # --- learning-rate schedule ---
    sched: Sched = option(Sched.COSINE)
    min_lr: float = option(1e-5, ge=0)
    warmup_epochs: int = option(0, ge=0)
    warmup_lr: float = option(1e-4, ge=0)
    decay_epochs: float = option(30, gt=0)
    decay_rate: float = option(0.1, gt=0)
    decay_by_epoch: bool = option(True)  # cosine: update the LR once per epoch (True) or every step (False)
    # --- training ---
    smoothing: float = option(0.0, ge=0, lt=1)
    seed: int = option(42, ge=0)  # may change on resume: RNG states come from the checkpoint
    amp: Amp = option(Amp.NONE)
    clip_grad: float | None = option(None, gt=0, example=5.0)  # max global grad norm; None = no clipping
    channels_last: bool = option(True)
    model_ema: bool = option(False)
    model_ema_decay: float = option(0.9998, ge=0, lt=1)
    drop_rate: float = option(0.0, ge=0, lt=1)  # classifier dropout (original `drop`); builders lacking it reject > 0
    drop_path_rate: float = option(0.0, ge=0, lt=1)  # stochastic depth (original `drop-path-rate`); same rule
    # --- augmentation ---
    aa: str | None = option(None, non_empty=True, example="rand-m9-mstd0.5")  # timm auto-augment spec
    reprob: float = option(0.0, ge=0, le=1)
    remode: Remode = option(Remode.PIXEL)
    color_jitter: float = option(0.0, ge=0)
    cutout_length: int = option(0, ge=0)  # CIFAR cutout side; 0 = off
    interpolation: Interpolation = option(Interpolation.BILINEAR)
    # None = the dataset's standard normalization
    image_mean: list[float] | None = option(None, length=3, example=[0.485, 0.456, 0.406])
    image_std: list[float] | None = option(None, length=3, gt=0, example=[0.229, 0.224, 0.225])
    # --- DyRep ---
    dyrep: bool = option(True, resume=_REFUSE)
    dbb: bool = option(False, resume=_REFUSE)  # static DBB baseline: every eligible conv a block from the start
    dyrep_block: BlockType = option(BlockType.BN, resume=_REFUSE)  # block type: bn (DBB) or online (OREPA-style)
    dyrep_adjust_interval: int = option(1, ge=1)
    dyrep_max_adjust_epochs: int = option(1000, ge=0)
    dyrep_recal_bn_iters: int = option(20, ge=0)  # BN recalibration of new branches after a grow
    dyrep_recal_bn_every_epoch: bool = option(False)  # recalibrate every BN on non-adjust epochs (RepVGG recipe)
    dyrep_recal_bn_every_epoch_iters: int = option(200, ge=1)  # iterations of that recalibration (original 200)
    dyrep_metric: DyRepMetric = option(DyRepMetric.SYNFLOW)
    dyrep_grow_topk: int = option(1, ge=0)
    dyrep_cut_threshold: float = option(0.1, ge=0)  # λ
    dyrep_cut_std_gate: float = option(0.02, ge=0)
    # refinement: a block's lone remaining non-kxk branch is cut below λ (the block collapses to a conv);
    # the original never cuts it
    dyrep_cut_lone_branch: bool = option(False)
    dyrep_cut_mode: CutMode = option(CutMode.RESET)
    dyrep_init_gamma: float = option(0.01, gt=0)
    dyrep_max_depth: int = option(2, ge=1)
    # --- Ray / runtime ---
    # Ray Train workers: a count, or [min, max] for an elastic run (original DyRep `workers` = DataLoader
    # workers -> num_data_workers)
    workers: int | list[int] = option(
        2, check=_check_workers, type_text="an int or a list [min, max] of two ints"
    )
    lr_scale_with_workers: bool = option(False)  # elastic: scale lr linearly with the current worker count
    use_gpu: bool | None = option(None, example=True)  # None = use GPUs when the cluster has them
    num_data_workers: int = option(0, ge=0)  # DataLoader worker processes per Ray worker
    log_interval: int = option(50, ge=1)
    mlflow_tracking_uri: str | None = option(None, non_empty=True, example="http://mlflow:5000")  # None = off
    tensorboard: bool = option(True)  # TensorBoard event files in the run directory
    # --- checkpoints & fault tolerance ---
    checkpoint_every: int = option(1, ge=1)  # epochs
    checkpoint_every_steps: int = option(0, ge=0)  # mid-epoch checkpoints every N steps; 0 = off
    keep_checkpoints: int = option(2, ge=1)
    max_failures: int = option(2, ge=-1)  # -1 = retry forever
    storage_path: str | None = option(None, non_empty=True, example="/mnt/runs")
    on_nonfinite: OnNonfinite = option(OnNonfinite.SKIP)

    def __post_init__(self) -> None:
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, _check_value(name, getattr(self, name)))
        for rule in CROSS_FIELD_RULES:
            rule(self)

    # -- derived -------------------------------------------------------------------------------------------

    @property
    def min_workers(self) -> int:
        """The fewest Ray workers the run may use (= ``workers`` unless it is an elastic ``[min, max]``)."""
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        """The most Ray workers the run may use."""
        return self.workers[1] if isinstance(self.workers, list) else self.workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list)

    # -- conversions ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields, in declaration order, as plain YAML/JSON-friendly values (enums as strings, list copies)."""
        return {name: _plain(getattr(self, name)) for name in _FIELD_NAMES}

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


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_FIELD_NAMES: tuple[str, ...] = tuple(_FIELDS)
_DEFAULTS: dict[str, Any] = {name: f.default for name, f in _FIELDS.items()}
_HINTS: dict[str, Any] = get_type_hints(TrainConfig)
_RULES: dict[str, Rule] = {name: field_rule(f) for name, f in _FIELDS.items()}

#: Enum-like keys -> their valid values (derived from the enum types of the fields).
CHOICES: dict[str, tuple[str, ...]] = {
    name: tuple(m.value for m in _split_optional(hint)[0])
    for name, hint in _HINTS.items() if _is_enum(_split_optional(hint)[0])
}
#: Keys a resumed run cannot change (declared with ``resume="refuse"``).
STRUCTURAL_KEYS: tuple[str, ...] = tuple(n for n in _FIELD_NAMES if _RULES[n].resume == RESUME_REFUSE)


def field_names() -> tuple[str, ...]:
    """Every config key, in declaration order."""
    return _FIELD_NAMES


def type_text(name: str) -> str:
    """The expected type of a key in words: ``an int``, ``a list of float or null`` ..."""
    return _type_name(_HINTS[name], _RULES[name])


def numeric_type(name: str) -> type | None:
    """``int`` or ``float`` for a numeric key (Optional or not), else None (e.g. for sweep ranges)."""
    inner = _split_optional(_HINTS[name])[0]
    return inner if inner in (int, float) else None


# ---------------------------------------------------------------------------------------------------------------
# Value checks (messages for config keys)
# ---------------------------------------------------------------------------------------------------------------


def _example(name: str) -> str:
    example = _RULES[name].example
    return f"{name}={_yaml_value(_plain(example if example is not None else _DEFAULTS[name]))}"


def _check_value(name: str, value: Any) -> Any:
    """Type-checked, normalized value of field ``name`` (per-field rules only); raises ConfigError."""
    hint, rule = _HINTS[name], _RULES[name]
    try:
        if rule.check is not None and value is not None:
            return rule.check(name, value)
        return check_field(hint, rule, value)
    except FieldProblem as problem:
        raise ConfigError(_config_message(name, hint, rule, problem)) from None


def _config_message(name: str, hint: Any, rule: Rule, problem: FieldProblem) -> str:
    value, kind = problem.value, problem.kind
    if kind == "null":
        return (f"config key {name!r} expects {_type_name(hint, rule)}, got null; set it, e.g. {_example(name)} "
                "(the default)")
    if kind == "finite":
        return f"config key {name!r} expects finite numbers, got {_short(value)}; e.g. {_example(name)}"
    if kind == "type":
        return (f"config key {name!r} expects {_type_name(hint, rule)}, got {_short(value)} "
                f"({type(value).__name__}); e.g. {_example(name)}")
    if kind == "choice":
        hint_text = f" (did you mean {problem.detail!r}?)" if problem.detail else ""
        return (f"config key {name!r} must be one of {', '.join(CHOICES[name])}; got {_short(value)}{hint_text}; "
                f"e.g. {_example(name)}")
    if kind == "empty":
        null_ok = " or null" if _split_optional(hint)[1] else ""
        return f"config key {name!r} must be a non-empty string{null_ok}, got {value!r}"
    if kind == "length":
        return (f"config key {name!r} needs exactly {rule.length} numbers, got {len(value)}: {_short(value)}; "
                f"e.g. {_example(name)} or null")
    if kind == "elements":
        return f"config key {name!r}: every value must be {problem.detail}, got {_short(value)}"
    return f"config key {name!r} must be {problem.detail}, got {_short(value)}; e.g. {_example(name)}"


# ---------------------------------------------------------------------------------------------------------------
# Cross-field rules (the only rules that are not declared on one field)
# ---------------------------------------------------------------------------------------------------------------


def _synthetic_fits_memory(cfg: TrainConfig) -> None:
    if cfg.dataset != Dataset.SYNTHETIC:
        return
    images = cfg.synthetic_train_size + cfg.synthetic_val_size
    need = images * 3 * cfg.image_size**2 * _SYNTHETIC_BYTES_PER_VALUE
    if need > MAX_SYNTHETIC_BYTES:
        raise ConfigError(f"synthetic data of {images:,} images of {cfg.image_size}x{cfg.image_size} would take "
                          f"{need / 2**30:.1f} GiB of memory (at most {MAX_SYNTHETIC_BYTES / 2**30:.0f}); lower "
                          "synthetic_train_size / synthetic_val_size / image_size")


def _data_dir_given(cfg: TrainConfig) -> None:
    if cfg.dataset in _DATASETS_WITH_DIR and cfg.data_dir is None:
        place = {
            "cifar10": "the directory holding cifar-10-batches-py",
            "cifar100": "the directory holding cifar-100-python",
        }.get(cfg.dataset, "the ImageNet root holding train/ and val/")
        raise ConfigError(
            f"dataset '{cfg.dataset}' needs data_dir, {place}; e.g. --set data_dir=/path/to/data, "
            f"or dataset=synthetic to run without files"
        )


def _parquet_train_given(cfg: TrainConfig) -> None:
    if cfg.dataset == Dataset.PARQUET and cfg.parquet_train is None:
        raise ConfigError(
            "dataset 'parquet' needs parquet_train (a Parquet file/dir or URI with image and label columns); "
            "e.g. --set parquet_train=/data/train.parquet"
        )


def _num_classes_match(cfg: TrainConfig) -> None:
    expected = DATASET_NUM_CLASSES.get(cfg.dataset)
    if expected is not None and cfg.num_classes is not None and cfg.num_classes != expected:
        raise ConfigError(
            f"config key 'num_classes' is {cfg.num_classes} but dataset '{cfg.dataset}' has {expected} classes; "
            f"set num_classes=null (from the dataset) or num_classes={expected}"
        )


def _nesterov_needs_momentum(cfg: TrainConfig) -> None:
    if cfg.opt == Opt.SGD and cfg.nesterov and cfg.momentum == 0:
        raise ConfigError(
            "config keys 'nesterov' and 'momentum': Nesterov SGD needs momentum > 0; "
            "set nesterov=false or e.g. momentum=0.9"
        )


def _dbb_is_not_dyrep(cfg: TrainConfig) -> None:
    if cfg.dbb and cfg.dyrep:
        raise ConfigError(
            "config keys 'dbb' and 'dyrep': a static DBB baseline run (dbb: true) has no growth or cuts; "
            "set dyrep: false (--set dyrep=false), or dbb: false for a DyRep run"
        )


def _metric_safe_under_amp(cfg: TrainConfig) -> None:
    # issue 12 item 6: synflow/snip of a conv before train-mode BN is eps-scale; bf16/fp16 flips its sign
    if cfg.dyrep and cfg.amp != Amp.NONE and cfg.dyrep_metric in AMP_UNSAFE_METRICS:
        raise ConfigError(
            f"config keys 'amp' and 'dyrep_metric': dyrep_metric '{cfg.dyrep_metric}' is unreliable under "
            f"amp '{cfg.amp}' (its eps-scale values flip sign versus float32, so the wrong convs grow); "
            f"set dyrep_metric: grad_norm or amp: none"
        )


#: Rules over several keys, applied in order after every key passed its own rules.
CROSS_FIELD_RULES: tuple[Callable[[TrainConfig], None], ...] = (
    _data_dir_given,
    _parquet_train_given,
    _num_classes_match,
    _nesterov_needs_momentum,
    _dbb_is_not_dyrep,
    _metric_safe_under_amp,
    _synthetic_fits_memory,
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


def _validated_items(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """Keys checked against the fields and each value checked on its own; errors are prefixed by ``source``."""
    prefix = f"{source}: " if source else ""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _DEFAULTS:
            from .original_format import original_key_hint

            message = _unknown_key_message(key, _FIELD_NAMES)
            hint = original_key_hint(key)
            raise ConfigError(prefix + message + (f"; {hint}" if hint else ""))
        try:
            out[key] = _check_value(key, value)
        except ConfigError as exc:
            raise ConfigError(prefix + str(exc)) from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Resume with a changed config (issue 17 item 5)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a run's saved config and the config it resumes with."""

    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_yaml_value(self.saved)} -> {_yaml_value(self.new)}"


def _saved_value(key: str, saved: Mapping[str, Any]) -> Any:
    """A saved value normalized like a new one; an absent key (older run) had the default of today."""
    if key not in saved:
        return _plain(_DEFAULTS[key])
    try:
        return _plain(_check_value(key, saved[key]))
    except ConfigError:  # a value today's rules refuse still compares as written
        return saved[key]


def resume_changes(saved: Mapping[str, Any], new: TrainConfig) -> list[ConfigChange]:
    """The keys ``new`` changes against a run's ``saved`` config (its ``config.json`` / checkpoint meta).

    Raises :class:`ConfigError` naming the key when a structural key (``resume="refuse"``, see
    :data:`STRUCTURAL_KEYS`) differs; returns the allowed changes (they take effect; the caller logs them).
    Saved keys that no longer exist are ignored.
    """
    if not isinstance(saved, Mapping):
        raise ConfigError(f"the run's saved config must be a mapping, got {type(saved).__name__}; "
                          f"start a new run (another --name)")
    changes: list[ConfigChange] = []
    current = new.to_dict()
    for key in _FIELD_NAMES:
        before, after = _saved_value(key, saved), current[key]
        if before == after:
            continue
        if _RULES[key].resume == RESUME_REFUSE:
            raise ConfigError(
                f"resume: config key {key!r} differs from the run's ({_short(before)} saved, {_short(after)} now) "
                f"and cannot change on resume; set {key}={_yaml_value(before)} or start a new run (another --name)"
            )
        changes.append(ConfigChange(key, before, after))
    return changes


# ---------------------------------------------------------------------------------------------------------------
# Original DyRep strategy files: re-exported from original_format (imported lazily: it builds on this module)
# ---------------------------------------------------------------------------------------------------------------

_ORIGINAL_EXPORTS = ("ORIGINAL_KEY_MAP", "ORIGINAL_ONLY_KEYS", "OriginalKey", "detect_format", "translate_original")


def __getattr__(name: str) -> Any:
    if name in _ORIGINAL_EXPORTS:
        from . import original_format

        return getattr(original_format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _read_yaml_file(path: str | os.PathLike) -> dict[Any, Any]:
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
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"config file {name!r} nests collections too deeply to read; a config is a flat "
                          f"mapping of key: value pairs") from None
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
    except RecursionError:
        raise ConfigError(f"override {text!r}: the value nests too deeply; give a plain value") from None
    return key, value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
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
    original_from_file: dict[str, Any] | None = None
    if path is not None:
        from .original_format import detect_format, translate_original

        name = os.fspath(path)
        raw = _read_yaml_file(name)
        fmt, reason = detect_format(raw)
        if fmt == ORIGINAL_FORMAT:
            logger.info("reading %s as an original DyRep strategy file (%s)", name, reason)
            from_file = original_from_file = translate_original(raw, source=f"config file {name!r}")
        else:
            body = {k: v for k, v in raw.items() if k != FORMAT_KEY}
            from_file = _validated_items(body, source=f"config file {name!r}")
        values.update(from_file)
    for text in overrides:
        key, value = parse_override(text)
        values.update(_validated_items({key: value}, source=f"--set {text!r}"))
    if original_from_file is not None:
        _original_file_notices(os.fspath(path), original_from_file, values)  # type: ignore[arg-type]
    return TrainConfig.from_dict(values)


def _original_file_notices(name: str, from_file: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """What an original strategy file leaves to its command line (model, --dyrep), one warning line each."""
    if "model" not in values:
        logger.warning(
            "%s names no model (the original passed it on the command line); using model=%r -- "
            "pass e.g. --set model=resnet18",
            name, _DEFAULTS["model"],
        )
    # issue 12 item 10: the original files say `dyrep: False`; the original enabled DyRep with --dyrep
    if from_file.get("dyrep") is False and values.get("dyrep") is False and not values.get("dbb"):
        logger.warning(
            "%s says dyrep: False, so this run trains without DyRep (the original enabled it with --dyrep on "
            "its command line); add --set dyrep=true to train with DyRep",
            name,
        )
