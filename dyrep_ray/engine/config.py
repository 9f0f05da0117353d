"""The validated training configuration of dyrep-ray: the public entry point (pure Python + PyYAML: no torch, no Ray).

One flat, frozen dataclass, :class:`TrainConfig`, holds every setting; its defaults are the built-in demo
experiment (``experiments/default.yaml`` spells them out). :func:`load_config` builds one from, in increasing
precedence::

    TrainConfig defaults  <  base (a dict, e.g. from a sweep)  <  YAML file  <  overrides ("key=value", --set)

The configuration is split by job, each module importing only those listed before it:

* :mod:`~dyrep_ray.engine.config_rules` -- the rule language: :func:`option`, :func:`check_field`, messages;
* :mod:`~dyrep_ray.engine.config_values` -- enum-like choices and size limits;
* :mod:`~dyrep_ray.engine.config_checks` -- the rules over several keys;
* :mod:`~dyrep_ray.engine.original_keys` -- the keys of original DyRep strategy files (pure data);
* :mod:`~dyrep_ray.engine.config_schema` -- :class:`TrainConfig`, every key with its rules and help;
* :mod:`~dyrep_ray.engine.original_format` -- original DyRep strategy files (detection, translation);
* this module -- reading YAML files and ``--set`` overrides, choosing the file's format, resume changes;
* :mod:`~dyrep_ray.engine.config_reference` -- docs/configuration.md, generated from the schema.

Every name callers use is importable from here. Docs: ``docs/configuration.md`` is generated from the schema by
``python -m dyrep_ray.engine.config_reference``.

Two YAML formats are read:

* **dyrep-ray format** (``experiments/*.yaml``): keys are :class:`TrainConfig` field names.
* **original DyRep strategy files** (``configs/strategies/DyRep/*.yaml`` of hunto/image_classification_sota):
  translated by :mod:`dyrep_ray.engine.original_format` (see there for the detection rule and key map).

Plain YAML 1.1 reads ``1e-4`` (no dot) as a string; float fields accept such strings, so ``lr: 1e-3`` works.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .config_checks import CROSS_FIELD_RULES
from .config_rules import (
    RULE_KEY,
    ConfigEnum,
    ConfigError,
    FieldProblem,
    Rule,
    check_field,
    field_rule,
    option,
    plain_value,
    short_repr,
    yaml_value,
)
from .config_schema import (
    CHOICES,
    LEGACY_VALUES,
    REMOVED_KEYS,
    STRUCTURAL_KEYS,
    TrainConfig,
    check_value,
    default_of,
    field_names,
    numeric_type,
    type_text,
    validated_items,
)
from .config_values import DATASET_NUM_CLASSES
from .original_format import (
    FORMAT_KEY,
    NATIVE_FORMAT,
    ORIGINAL_FORMAT,
    ORIGINAL_KEY_MAP,
    ORIGINAL_ONLY_KEYS,
    OriginalKey,
    detect_format,
    translate_original,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "CROSS_FIELD_RULES",
    "LEGACY_VALUES",
    "DATASET_NUM_CLASSES",
    "FORMAT_KEY",
    "NATIVE_FORMAT",
    "ORIGINAL_FORMAT",
    "ORIGINAL_KEY_MAP",
    "ORIGINAL_ONLY_KEYS",
    "REMOVED_KEYS",
    "RULE_KEY",
    "STRUCTURAL_KEYS",
    "ConfigChange",
    "ConfigEnum",
    "ConfigError",
    "FieldProblem",
    "OriginalKey",
    "Rule",
    "TrainConfig",
    "check_field",
    "detect_format",
    "field_names",
    "field_rule",
    "load_config",
    "numeric_type",
    "option",
    "parse_override",
    "resume_changes",
    "short_repr",
    "translate_original",
    "type_text",
]


# ---------------------------------------------------------------------------------------------------------------
# Resume with a changed config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a run's saved config and the config it resumes with."""

    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {yaml_value(self.saved)} -> {yaml_value(self.new)}"


def _saved_value(key: str, saved: Mapping[str, Any]) -> Any:
    """A saved value normalized like a new one; an absent key (older run) had the default of today."""
    if key not in saved:
        return plain_value(default_of(key))
    try:
        return plain_value(check_value(key, saved[key]))
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
    for key in field_names():
        if key not in saved and key in LEGACY_VALUES:
            _check_legacy_key(key, saved, current[key])
            continue
        before, after = _saved_value(key, saved), current[key]
        if before == after:
            continue
        if key in STRUCTURAL_KEYS:
            raise ConfigError(
                f"resume: config key {key!r} differs from the run's ({short_repr(before)} saved, "
                f"{short_repr(after)} now) "
                f"and cannot change on resume; set {key}={yaml_value(before)} or start a new run (another --name)"
            )
        changes.append(ConfigChange(key, before, after))
    return changes


def _check_legacy_key(key: str, saved: Mapping[str, Any], value: Any) -> None:
    """A run saved before ``key`` existed resumes only with the value it trained with, where that value matters."""
    legacy, applies = LEGACY_VALUES[key]
    try:
        relevant = bool(applies(lambda name: _saved_value(name, saved)))
    except TypeError:  # a saved value today's rules refuse: assume it mattered
        relevant = True
    if relevant and plain_value(legacy) != value:
        setting = f"{key}={yaml_value(plain_value(legacy))}"
        raise ConfigError(
            f"resume: the run was started before config key {key!r} existed and trained as with {setting} "
            f"({short_repr(value)} now); set {setting} to resume it as it was, or start a new run (another --name)"
        )


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
        raise ConfigError(f"an override must be a 'key=value' string, got {short_repr(text)}")
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
        values.update(validated_items(base, source="base config"))
    original_from_file: dict[str, Any] | None = None
    if path is not None:
        name = os.fspath(path)
        raw = _read_yaml_file(name)
        fmt, reason = detect_format(raw)
        if fmt == ORIGINAL_FORMAT:
            logger.info("reading %s as an original DyRep strategy file (%s)", name, reason)
            from_file = original_from_file = translate_original(raw, source=f"config file {name!r}")
        else:
            body = {k: v for k, v in raw.items() if k != FORMAT_KEY}
            from_file = validated_items(body, source=f"config file {name!r}")
        values.update(from_file)
    for text in overrides:
        key, value = parse_override(text)
        values.update(validated_items({key: value}, source=f"--set {text!r}"))
    if original_from_file is not None:
        _original_file_notices(os.fspath(path), original_from_file, values)  # type: ignore[arg-type]
    return TrainConfig.from_dict(values)


def _original_file_notices(name: str, from_file: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """What an original strategy file leaves to its command line (model, --dyrep), one warning line each."""
    if "model" not in values:
        logger.warning(
            "%s names no model (the original passed it on the command line); using model=%r -- "
            "pass e.g. --set model=resnet18",
            name, default_of("model"),
        )
    # the original files say `dyrep: False`; the original enabled DyRep with --dyrep
    if from_file.get("dyrep") is False and values.get("dyrep") is False and not values.get("dbb"):
        logger.warning(
            "%s says dyrep: False, so this run trains without DyRep (the original enabled it with --dyrep on "
            "its command line); add --set dyrep=true to train with DyRep",
            name,
        )
