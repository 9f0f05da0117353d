"""The configuration schema: :class:`TrainConfig`, every key declared once with its rules and help (pure Python).

Each key is one :func:`~dyrep_ray.engine.config_rules.option` declaration: default, bounds, example value for
messages, resume policy (``resume=_REFUSE``: a structural key a resumed run cannot change) and its one-line
``help`` (the configuration reference, docs/configuration.md, is generated from these). Adding a key is one
declaration here (plus its line in ``experiments/default.yaml``, which lists every key). Rules over several keys
live in :mod:`~dyrep_ray.engine.config_checks`.

Every value is checked when a :class:`TrainConfig` is created (also by :meth:`TrainConfig.replace` and direct
construction): unknown and removed keys, types (ints are accepted for float fields, a bool is never an int,
``None`` only for Optional fields), ranges, enumerations and the cross-field rules. Every problem raises
:class:`~dyrep_ray.engine.config_rules.ConfigError`, whose message is one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import yaml

from .config_checks import CROSS_FIELD_RULES, DEFAULT_BATCH_SIZE
from .config_rules import (
    RESUME_REFUSE,
    ConfigError,
    FieldProblem,
    Rule,
    check_field,
    check_int_magnitude,
    describe_type,
    field_message,
    field_rule,
    is_enum,
    option,
    plain_value,
    short_repr,
    split_optional,
    unknown_key_message,
)
from .config_values import (
    MAX_IMAGE_SIZE,
    MAX_NUM_CLASSES,
    MAX_SYNTHETIC_SIZE,
    Amp,
    BlockType,
    CutMode,
    CutOrder,
    Dataset,
    DbbConvert,
    DyRepMetric,
    GrowOptimState,
    Interpolation,
    OnNonfinite,
    Opt,
    Remode,
    Sched,
    SchedRule,
)
from .original_keys import original_key_hint

__all__ = [
    "CHOICES",
    "LEGACY_VALUES",
    "REMOVED_KEYS",
    "STRUCTURAL_KEYS",
    "TrainConfig",
    "check_value",
    "default_of",
    "field_names",
    "hint_of",
    "numeric_type",
    "rule_of",
    "type_text",
    "validated_items",
]

_ELASTIC_LEN = 2
_REFUSE = RESUME_REFUSE


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
                f"config key {name!r} as an elastic range [min, max] needs 1 <= min <= max, got {short_repr(value)}; "
                f"e.g. {name}=[2,4]"
            )
        return [low, high]
    raise FieldProblem("type", value)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a dyrep-ray run. Defaults = the built-in demo experiment (``experiments/default.yaml``).

    Frozen: derive variants with :meth:`replace`. Creating one validates every field (see module docstring).
    Keys marked ``resume=_REFUSE`` change what is trained: a resumed run refuses a change of them.
    """

    # --- model & data ---
    model: str = option("small_cnn", non_empty=True, resume=_REFUSE,
                        help="network name from the model registry (e.g. resnet18, vgg16_cifar, timm/<name>)")
    dataset: Dataset = option(Dataset.SYNTHETIC, resume=_REFUSE, help="training and validation data")
    data_dir: str | None = option(None, non_empty=True, example="data/cifar",
                                  help="root of the CIFAR python-format dirs / ImageNet train+val folders; "
                                       "may move between resumes (same data)")
    num_classes: int | None = option(None, ge=1, le=MAX_NUM_CLASSES, example=10, resume=_REFUSE,
                                     help="classifier outputs; null = from the dataset")
    image_size: int = option(32, ge=1, le=MAX_IMAGE_SIZE, resume=_REFUSE, help="input side in pixels")
    synthetic_train_size: int = option(2048, ge=1, le=MAX_SYNTHETIC_SIZE,
                                       help="images in the synthetic training split")
    synthetic_val_size: int = option(512, ge=1, le=MAX_SYNTHETIC_SIZE,
                                     help="images in the synthetic validation split")
    parquet_train: str | None = option(None, non_empty=True, example="/data/train.parquet",
                                       help="dataset parquet: training Parquet file/dir or URI (image, label)")
    parquet_val: str | None = option(None, non_empty=True, example="/data/val.parquet",
                                     help="dataset parquet: validation Parquet file/dir or URI")
    # --- schedule & batch ---
    epochs: int = option(6, ge=1, help="training epochs")
    batch_size: int = option(DEFAULT_BATCH_SIZE, ge=1,
                             help="per Ray worker; total = batch_size * workers (unused with global_batch_size)")
    global_batch_size: int | None = option(None, ge=1, example=64,
                                           help="samples per step at any worker count; null = batch_size * workers")
    micro_batch_size: int | None = option(None, ge=1, example=8,
                                          help="with global_batch_size: the fixed micro-batch dealt to workers; "
                                               "null = global_batch_size / gcd(global_batch_size, 8)")
    val_batch_size: int | None = option(None, ge=1, example=128,
                                        help="validation batch per worker; null = batch_size")
    # --- optimizer ---
    opt: Opt = option(Opt.SGD, resume=_REFUSE,
                      help="optimizer (the saved optimizer state is per optimizer type)")
    lr: float = option(0.05, gt=0, help="peak learning rate")
    momentum: float = option(0.9, ge=0, lt=1, help="SGD momentum")
    nesterov: bool = option(True, help="Nesterov momentum for SGD")
    weight_decay: float = option(5e-4, ge=0, help="L2 weight decay")
    opt_eps: float = option(1e-8, gt=0, help="AdamW epsilon")
    opt_betas: list[float] | None = option(None, length=2, ge=0, lt=1, example=[0.9, 0.999],
                                           help="AdamW betas; null = torch's defaults")
    opt_no_filter: bool = option(False, help="false = bias and BN parameters are excluded from weight decay")
    # --- learning-rate schedule ---
    sched: Sched = option(Sched.COSINE, help="learning-rate schedule")
    min_lr: float = option(1e-5, ge=0, help="cosine: the final learning rate")
    warmup_epochs: int = option(0, ge=0, help="epochs of linear warmup from warmup_lr")
    warmup_lr: float = option(1e-4, ge=0, help="learning rate at the start of the warmup")
    decay_epochs: float = option(30, gt=0, help="step: epochs between decays")
    decay_rate: float = option(0.1, gt=0, help="step: factor of each decay")
    decay_by_epoch: bool = option(True,
                                  help="cosine: update the learning rate once per epoch (true) or every step (false)")
    sched_rule: SchedRule = option(SchedRule.ORIGINAL,
                                   help="original: the original's per-step values (warm-up rises once per epoch); "
                                        "fractional: a function of the fractional epoch (per-step warm-up)")
    # --- training ---
    smoothing: float = option(0.0, ge=0, lt=1, help="label smoothing")
    seed: int = option(42, ge=0, help="random seed; may change on resume (RNG states come from the checkpoint)")
    amp: Amp = option(Amp.NONE, help="automatic mixed precision")
    clip_grad: float | None = option(None, gt=0, example=5.0, help="max global gradient norm; null = no clipping")
    channels_last: bool = option(True, help="channels-last memory format")
    compile: bool = option(False, help="train the model under torch.compile (compiled again once after each "
                                       "structure change; never falls back to eager silently)")
    cudnn_benchmark: bool = option(True, help="CUDA: cuDNN times its conv algorithms per shape and keeps the "
                                   "fastest (new shapes after a structure change are timed again); false = "
                                   "repeatable kernel choice")
    model_ema: bool = option(False, help="keep an exponential moving average of the weights (validated too)")
    model_ema_decay: float = option(0.9998, ge=0, lt=1, help="decay of the weight average")
    drop_rate: float = option(0.0, ge=0, lt=1,
                              help="classifier dropout (original `drop`); models without it refuse > 0")
    drop_path_rate: float = option(0.0, ge=0, lt=1,
                                   help="stochastic depth (original `drop-path-rate`); models without it refuse > 0")
    # --- augmentation ---
    aa: str | None = option(None, non_empty=True, example="rand-m9-mstd0.5",
                            help="timm auto-augment spec; null = off")
    reprob: float = option(0.0, ge=0, le=1, help="random-erasing probability")
    remode: Remode = option(Remode.PIXEL, help="random-erasing fill mode")
    color_jitter: float = option(0.0, ge=0, help="color-jitter strength")
    cutout_length: int = option(0, ge=0, help="CIFAR cutout side in pixels; 0 = off")
    interpolation: Interpolation = option(Interpolation.BILINEAR, help="resize interpolation")
    image_mean: list[float] | None = option(None, length=3, example=[0.485, 0.456, 0.406],
                                            help="per-channel normalization mean; null = the dataset's standard")
    image_std: list[float] | None = option(None, length=3, gt=0, example=[0.229, 0.224, 0.225],
                                           help="per-channel normalization std; null = the dataset's standard")
    # --- DyRep ---
    dyrep: bool = option(True, resume=_REFUSE, help="grow and cut re-parameterized blocks during training (DyRep)")
    dbb: bool = option(False, resume=_REFUSE,
                       help="static DBB baseline: convs are blocks from the start (which: dbb_convert)")
    dbb_convert: DbbConvert = option(DbbConvert.ORIGINAL, resume=_REFUSE,
                                     help="original: 3x3 convs, four branches, new weights, next BN an identity; "
                                          "every_conv: every eligible conv, all branches, conv weights and BNs kept")
    dyrep_block: BlockType = option(BlockType.BN, resume=_REFUSE,
                                    help="block type: bn (DBB, a BN per branch) or online (OREPA-style)")
    dyrep_adjust_interval: int = option(1, ge=1, help="adjust the structure every N epochs")
    dyrep_max_adjust_epochs: int = option(1000, ge=0, help="no structure adjustment after this epoch")
    dyrep_recal_bn_iters: int = option(20, ge=0, help="BN recalibration iterations of new branches after a grow")
    dyrep_recal_bn_every_epoch: bool = option(False,
                                              help="recalibrate every BN on non-adjust epochs (RepVGG recipe)")
    dyrep_recal_bn_every_epoch_iters: int = option(200, ge=1,
                                                   help="iterations of that recalibration (original 200)")
    recal_bn_without_dyrep: bool = option(False,
                                          help="dyrep_recal_bn_every_epoch also when dyrep is off; the original "
                                               "recalibrates only with DyRep")
    dyrep_metric: DyRepMetric = option(DyRepMetric.SYNFLOW, help="importance metric that picks the convs to grow")
    dyrep_metric_fp32: bool = option(False, help="TF32 off (full fp32) in the training steps of the epochs that "
                                                 "record the metric; CUDA only, see docs/algorithm.md")
    dyrep_grow_topk: int = option(1, ge=0, help="convs grown per adjustment")
    dyrep_cut_threshold: float = option(0.1, ge=0, help="λ: branches weaker than this are cut")
    dyrep_cut_std_gate: float = option(0.02, ge=0,
                                       help="cut only when the std of a block's branch weights exceeds this")
    dyrep_cut_lone_branch: bool = option(False,
                                         help="cut a block's lone remaining non-kxk branch below λ (the block "
                                              "collapses to a conv); the original never cuts it")
    dyrep_cut_mode: CutMode = option(CutMode.RESET,
                                     help="reset: the original's kxk BN reset; absorb: the cut branch folded into kxk")
    dyrep_cut_order: CutOrder = option(CutOrder.ORIGINAL,
                                       help="original: blocks judged and cut outermost first, each after the cuts "
                                            "before it; inner_first: all judged first, innermost cut first")
    dyrep_grow_optim_state: GrowOptimState = option(GrowOptimState.RESTART,
                                                    help="restart: grown or cut convs start with fresh optimizer "
                                                         "state (the original); carry: they keep the conv's")
    dyrep_init_gamma: float = option(0.01, gt=0, help="initial scale (last BN gamma) of new branches")
    dyrep_max_depth: int = option(2, ge=1, help="most nested blocks a conv may be grown into")
    # --- Ray / runtime ---
    workers: int | list[int] = option(
        2, check=_check_workers, type_text="an int or a list [min, max] of two ints",
        must="an int >= 1, or [min, max] with 1 <= min <= max (elastic)",
        help="Ray Train workers, or [min, max] for an elastic run (the original's `workers` is num_data_workers)",
    )
    elastic_resize_monitor_interval_s: float | None = option(
        None, gt=0, example=10.0, help="elastic: seconds between Ray's looks for capacity to grow into; "
                                       "null = DYREP_RAY_ELASTIC_RESIZE_INTERVAL_S, else 10")
    preemption_check_steps: int = option(5, ge=1, help="steps between two checks for a drain (a Ray collective "
                                                          "each); bounds drain -> checkpoint to this many steps")
    preemption_poll_interval_s: float | None = option(
        1.0, gt=0, example=1.0, help="seconds between Ray Train's looks for drained nodes (sets "
                                     "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S, Ray: 5; not in sweeps); null = leave it")
    worker_group_start_timeout_s: float | None = option(
        None, gt=0, example=20.0, help="Ray Train's limit on starting a worker group (sets "
                                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, Ray: 60; not in sweeps); "
                                       "null = leave it")
    lr_scale_with_workers: bool = option(False, help="elastic: scale lr linearly with the current worker count")
    use_gpu: bool | None = option(None, example=True, help="null = use GPUs when the cluster has them")
    num_data_workers: int = option(0, ge=0, help="DataLoader worker processes per Ray worker")
    mlflow_tracking_uri: str | None = option(None, non_empty=True, example="http://mlflow:5000",
                                             help="MLflow tracking server; null = no MLflow")
    tensorboard: bool = option(True, help="TensorBoard event files in the run directory")
    # --- checkpoints & fault tolerance ---
    checkpoint_every: int = option(1, ge=1, help="checkpoint every N epochs")
    checkpoint_every_steps: int = option(0, ge=0, help="mid-epoch checkpoints every N steps; 0 = off")
    keep_checkpoints: int = option(2, ge=1, help="checkpoints kept (the newest)")
    max_failures: int = option(2, ge=-1, help="restarts after a worker failure; -1 = retry forever")
    storage_path: str | None = option(None, non_empty=True, example="/mnt/runs",
                                      help="where run directories go (a path or URI, e.g. s3://...); "
                                           "null = the --output directory")
    debug_sample_record: bool = option(False, help="with global_batch_size: record every sample id each step "
                                                   "consumed (sample_record/ in the run dir)")
    on_nonfinite: OnNonfinite = option(OnNonfinite.SKIP,
                                       help="a non-finite loss or gradient: skip the step, stop, or ignore it")

    def __post_init__(self) -> None:
        for name in _FIELD_NAMES:
            object.__setattr__(self, name, check_value(name, getattr(self, name)))
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
        return {name: plain_value(getattr(self, name)) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validated config from field names -> values; missing fields take their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of key: value pairs, got {type(data).__name__}")
        return cls(**validated_items(data, source=None))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (unknown keys raise :class:`ConfigError`)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        """The config as a dyrep-ray format YAML document (loads back with ``load_config``)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


#: Keys earlier versions accepted -> why they are gone; a config that sets one is refused with that reason.
REMOVED_KEYS: dict[str, str] = {
    "log_interval": "it never had an effect (dyrep-ray logs once per epoch)",
}

#: Keys added after run directories of an earlier version existed -> (the value such a run, whose saved config
#: lacks the key, trained with; when that value mattered, a test over the saved config's values).  Resuming such
#: a run with another value is refused, naming the key and the value that restores its behaviour.
LEGACY_VALUES: dict[str, tuple[Any, Callable[[Callable[[str], Any]], bool]]] = {
    "sched_rule": (SchedRule.FRACTIONAL,
                   lambda v: v("warmup_epochs") > 0 or v("decay_by_epoch") is False or v("sched") == Sched.STEP),
    "dbb_convert": (DbbConvert.EVERY_CONV, lambda v: v("dbb") is True),
    "recal_bn_without_dyrep": (True, lambda v: v("dyrep") is False and v("dyrep_recal_bn_every_epoch") is True),
    "dyrep_cut_order": (CutOrder.INNER_FIRST, lambda v: v("dyrep") is True and v("dyrep_max_depth") >= 2),
    "dyrep_grow_optim_state": (GrowOptimState.CARRY, lambda v: v("dyrep") is True),
}

_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_FIELD_NAMES: tuple[str, ...] = tuple(_FIELDS)
_DEFAULTS: dict[str, Any] = {name: f.default for name, f in _FIELDS.items()}
_HINTS: dict[str, Any] = get_type_hints(TrainConfig)
_RULES: dict[str, Rule] = {name: field_rule(f) for name, f in _FIELDS.items()}

#: Enum-like keys -> their valid values (derived from the enum types of the fields).
CHOICES: dict[str, tuple[str, ...]] = {
    name: tuple(m.value for m in split_optional(hint)[0])
    for name, hint in _HINTS.items() if is_enum(split_optional(hint)[0])
}
#: Keys a resumed run cannot change (declared with ``resume="refuse"``).
STRUCTURAL_KEYS: tuple[str, ...] = tuple(n for n in _FIELD_NAMES if _RULES[n].resume == RESUME_REFUSE)


def field_names() -> tuple[str, ...]:
    """Every config key, in declaration order."""
    return _FIELD_NAMES


def default_of(name: str) -> Any:
    """The declared default of key ``name``."""
    return _DEFAULTS[name]


def hint_of(name: str) -> Any:
    """The type hint of key ``name`` (``int``, ``float | None``, an enum ...)."""
    return _HINTS[name]


def rule_of(name: str) -> Rule:
    """The :class:`~dyrep_ray.engine.config_rules.Rule` declared for key ``name``."""
    return _RULES[name]


def type_text(name: str) -> str:
    """The expected type of a key in words: ``an int``, ``a list of float or null`` ..."""
    return describe_type(_HINTS[name], _RULES[name])


def numeric_type(name: str) -> type | None:
    """``int`` or ``float`` for a numeric key (Optional or not), else None (e.g. for sweep ranges)."""
    inner = split_optional(_HINTS[name])[0]
    return inner if inner in (int, float) else None


def check_value(name: str, value: Any) -> Any:
    """Type-checked, normalized value of field ``name`` (per-field rules only); raises ConfigError."""
    hint, rule = _HINTS[name], _RULES[name]
    try:
        if rule.check is not None and value is not None:
            return check_int_magnitude(rule.check(name, value))
        return check_field(hint, rule, value)
    except FieldProblem as problem:
        raise ConfigError(field_message(name, hint, rule, _DEFAULTS[name], problem)) from None


def validated_items(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """Keys checked against the fields and each value checked on its own; errors are prefixed by ``source``."""
    prefix = f"{source}: " if source else ""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _DEFAULTS:
            if isinstance(key, str) and key in REMOVED_KEYS:
                raise ConfigError(f"{prefix}config key {key!r} was removed: {REMOVED_KEYS[key]}; delete it")
            message = unknown_key_message(key, _FIELD_NAMES)
            hint = original_key_hint(key)
            raise ConfigError(prefix + message + (f"; {hint}" if hint else ""))
        try:
            out[key] = check_value(key, value)
        except ConfigError as exc:
            raise ConfigError(prefix + str(exc)) from None
    return out
