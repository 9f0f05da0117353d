"""Original DyRep strategy files (hunto/image_classification_sota, ``lib/utils/args.py`` +
``configs/strategies/DyRep``) read as dyrep-ray configuration.

A file is read in the original format when it has the marker ``format: dyrep-original``, or -- without a
marker -- when it contains at least one key that exists only in the original format (see
:data:`ORIGINAL_ONLY_KEYS`: e.g. ``sgd_no_nesterov``, ``drop``, ``clip_grad_norm``, ``val_batch_size_multiplier``,
or any key spelled with a hyphen such as ``drop-path-rate``). ``format: dyrep-ray`` forces the dyrep-ray
format. Every original key is translated by :data:`ORIGINAL_KEY_MAP` (copied, renamed -- ``workers`` is
DataLoader workers there, so it becomes ``num_data_workers`` -- negated, converted, ignored with a warning, or
rejected when it would switch on a feature dyrep-ray does not implement). As the original's dataset builder did,
``dataset`` also fixes ``image_size`` (224 ImageNet, 32 CIFAR) and, without ``data_path``, sets ``data_dir`` to
``data/imagenet`` or ``data/cifar``. ``dbb: True`` without a ``dyrep`` key sets ``dyrep`` false (the original's
argparse default; a DBB baseline has no growth). Other keys an original file leaves out keep the dyrep-ray
defaults (the original argparse defaults are not applied; the shipped strategy files set every key whose
default differs). The original passed the model, ``--dyrep`` and the GPU count on the command line: give them
with ``--set model=resnet18 --set dyrep=true --set workers=8 --set use_gpu=true``
(:func:`~dyrep_ray.engine.config.load_config` warns when a file says ``dyrep: False``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from .config import (
    _DEFAULTS,
    _HINTS,
    FORMAT_KEY,
    NATIVE_FORMAT,
    ORIGINAL_FORMAT,
    ConfigError,
    _check_value,
    _coerce_scalar,
    _short,
    _split_optional,
    _unknown_key_message,
    _yaml_value,
)

logger = logging.getLogger(__name__)

__all__ = ["ORIGINAL_KEY_MAP", "ORIGINAL_ONLY_KEYS", "OriginalKey", "detect_format", "original_key_hint",
           "translate_original"]


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

    field: str | None
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
    "dbb": OriginalKey("dbb", "copy", "static DBB baseline; true without a dyrep key also sets dyrep: false"),
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


def original_key_hint(key: Any) -> str:
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


def _model_from_original(model: Any, model_config: Any, source: str) -> str | None:
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
    # a DBB baseline (the original's --dbb) trains without DyRep: the original's argparse default dyrep=False
    if out.get("dbb") is True and "dyrep" not in out:
        out["dyrep"] = False
    if "num_data_workers" in out:
        logger.info(
            "%s: original 'workers: %s' means DataLoader workers -> num_data_workers=%s; the number of Ray "
            "workers (GPUs) is `workers` -- e.g. --set workers=8 for the original 8-GPU runs",
            source, normalized.get("workers"), out["num_data_workers"],
        )
    return out
