"""Original DyRep strategy files (hunto/image_classification_sota, ``lib/utils/args.py`` +
``configs/strategies/DyRep``) read as dyrep-ray configuration.

A file is read in the original format when it has the marker ``format: dyrep-original``, or -- without a
marker -- when it contains at least one key that exists only in the original format (see
:data:`ORIGINAL_ONLY_KEYS`: e.g. ``sgd_no_nesterov``, ``drop``, ``clip_grad_norm``, ``val_batch_size_multiplier``,
or any key spelled with a hyphen such as ``drop-path-rate``). ``format: dyrep-ray`` forces the dyrep-ray
format. Every original key is translated by :data:`ORIGINAL_KEY_MAP` (declared in
:mod:`~dyrep_ray.engine.original_keys`; copied, renamed -- ``workers`` is
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
import math
import re
from collections.abc import Mapping
from typing import Any

from .config_rules import ConfigError, coerce_scalar, short_repr, split_optional, unknown_key_message, yaml_value
from .config_schema import REMOVED_KEYS, check_value, default_of, field_names, hint_of
from .original_keys import ORIGINAL_KEY_MAP, OriginalKey, original_key_hint

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_KEY", "NATIVE_FORMAT", "ORIGINAL_FORMAT", "ORIGINAL_KEY_MAP", "ORIGINAL_ONLY_KEYS", "OriginalKey",
           "detect_format", "original_key_hint", "translate_original"]

#: The optional marker key of a config file naming its format.
FORMAT_KEY = "format"
NATIVE_FORMAT = "dyrep-ray"
ORIGINAL_FORMAT = "dyrep-original"

#: Keys that mark a file without a ``format:`` marker as an original DyRep strategy file (together with any
#: hyphenated key): original keys that are not dyrep-ray field names. A key dyrep-ray removed (``log_interval``)
#: is not one: a dyrep-ray file still setting it gets the removed-key message, not an original-format reading.
ORIGINAL_ONLY_KEYS: frozenset[str] = frozenset(
    k for k in ORIGINAL_KEY_MAP if k not in field_names() and k not in REMOVED_KEYS
)

# what the original's lib/dataset/builder.py fixes per dataset (data_path '' -> these, input_shape)
_ORIGINAL_DATA_DIRS = {"imagenet": "data/imagenet", "cifar10": "data/cifar", "cifar100": "data/cifar"}
_ORIGINAL_IMAGE_SIZES = {"imagenet": 224, "cifar10": 32, "cifar100": 32}

_VGG_CIFAR_CONFIG = re.compile(r"vgg16_cifar(10|100)?\.ya?ml$", re.IGNORECASE)


def detect_format(raw: Mapping[Any, Any]) -> tuple[str, str]:
    """``(NATIVE_FORMAT | ORIGINAL_FORMAT, reason)`` of a parsed YAML mapping (see module docstring)."""
    if FORMAT_KEY in raw:
        marker = raw[FORMAT_KEY]
        if marker not in (NATIVE_FORMAT, ORIGINAL_FORMAT):
            raise ConfigError(
                f"config key 'format' must be {NATIVE_FORMAT!r} or {ORIGINAL_FORMAT!r}, got {short_repr(marker)}; "
                f"remove it to detect the format automatically"
            )
        return marker, f"marker format: {marker}"
    for key in raw:
        if isinstance(key, str) and (key in ORIGINAL_ONLY_KEYS or "-" in key):
            return ORIGINAL_FORMAT, f"it contains the original-only key {key!r}"
    return NATIVE_FORMAT, "no original-only keys"


def _neutral_text(value: Any) -> str:
    return "an empty string" if value == "" else yaml_value(value)


def _model_from_original(model: Any, model_config: Any, source: str) -> str | None:
    if model_config not in (None, "") and not isinstance(model_config, str):
        raise ConfigError(
            f"{source}: original key 'model_config' expects a path string, got {short_repr(model_config)}"
        )
    if model is None and model_config in (None, ""):
        return None
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"{source}: original key 'model' expects a string, got {short_repr(model)}")
    if model in (None, "nas_model"):
        if model_config and _VGG_CIFAR_CONFIG.search(model_config):
            return "vgg16_cifar"
        raise ConfigError(
            f"{source}: original model 'nas_model' with model_config {short_repr(model_config)} is not supported "
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
            raise ConfigError(f"{source}: {unknown_key_message(key, list(ORIGINAL_KEY_MAP), 'original DyRep key')}")
        name = key.replace("-", "_")
        if name not in ORIGINAL_KEY_MAP:
            message = unknown_key_message(
                name, list(ORIGINAL_KEY_MAP), "original DyRep key", "valid keys are those of ORIGINAL_KEY_MAP"
            )
            if name in field_names():
                message += (
                    f"; {name!r} is a dyrep-ray key: in an original strategy file give it with --set {name}=..., "
                    f"or write the whole file in dyrep-ray form"
                )
            raise ConfigError(f"{source}: {message}")
        if name in normalized and normalized[name] != value:
            raise ConfigError(
                f"{source}: original key {name!r} is given twice (with '-' and '_') with different values "
                f"{short_repr(normalized[name])} and {short_repr(value)}; keep one"
            )
        normalized[name] = value

    out: dict[str, Any] = {}
    ignored: list[str] = []

    def put(field: str, value: Any, original: str) -> None:
        try:
            out[field] = check_value(field, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: original key {original!r} (-> {field!r}): {exc}") from None

    for name, value in normalized.items():
        entry = ORIGINAL_KEY_MAP[name]
        if entry.action == "copy":
            assert entry.field is not None
            if value is None and not split_optional(hint_of(entry.field))[1]:
                logger.debug("original key %r is null: keeping the dyrep-ray default of %r", name, entry.field)
                continue
            put(entry.field, value, name)
        elif entry.action == "negate":
            assert entry.field is not None
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{source}: original key {name!r} expects true or false, got {short_repr(value)} "
                    f"({type(value).__name__})"
                )
            put(entry.field, not value, name)
        elif entry.action == "ignore":
            ignored.append(f"{name} ({entry.note})")
        elif entry.action == "off-only":
            if value not in entry.neutral:
                raise ConfigError(
                    f"{source}: original DyRep key {name!r}={short_repr(value)} is not supported by dyrep-ray "
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
                f"{source}: original key 'clip_grad_norm' expects true or false, got {short_repr(enabled)}"
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
            multiplier = coerce_scalar(multiplier, float)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: original key 'val_batch_size_multiplier' expects a number, got {short_repr(multiplier)}"
            ) from None
        if multiplier <= 0:
            raise ConfigError(
                f"{source}: original key 'val_batch_size_multiplier' must be > 0, got {multiplier}"
            )
        if multiplier != 1.0:
            batch = out.get("batch_size", default_of("batch_size"))
            product = batch * multiplier if isinstance(batch, (int, float)) else float("nan")
            if not math.isfinite(product):  # 1e308 x 64 is inf: int() of it would raise OverflowError
                raise ConfigError(f"{source}: original key 'val_batch_size_multiplier' {multiplier:g} x batch_size "
                                  f"{short_repr(batch)} is not a usable validation batch size; use e.g. 2")
            put("val_batch_size", max(1, int(product)), "val_batch_size_multiplier")

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
