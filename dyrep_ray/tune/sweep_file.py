"""Reading a sweep file: where its YAML is, its ``--set`` overrides, its top-level keys and its base config.

A sweep names its experiment config with ``base:`` (relative to the sweep file or the cwd, or one the package
ships) and overrides it with ``config:``; ``--set`` reaches both the sweep's keys (dotted for nesting) and the
config's. Problems raise :class:`~dyrep_ray.engine.config.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import ConfigError, TrainConfig, field_names, load_config, parse_override, short_repr
from ..package_data import shipped_experiment
from .sections import closest

#: The keys a sweep file may have at its top level.
TOP_KEYS = ("name", "description", "base", "config", "search_space", "metric", "mode", "num_samples",
            "max_concurrent_trials", "resources", "scheduler", "search_alg", "max_failures")


def read_sweep(path: str | os.PathLike | None, overrides: Sequence[str] = (),
               raw: Mapping[str, Any] | None = None) -> tuple[dict, Path | None, str]:
    """``(raw, sweep_path, source)``: the sweep mapping with ``overrides`` applied and its top-level keys checked.

    ``raw`` (already parsed) is used instead of reading ``path``; ``sweep_path`` is the file (None inline, the
    shipped sweep of that name when ``path`` is not a file here) and ``source`` names the sweep in messages.
    """
    sweep_path = Path(path) if path is not None else None
    source = str(sweep_path) if sweep_path is not None else "<inline>"
    if raw is None and sweep_path is not None and not sweep_path.is_file() and not sweep_path.is_absolute():
        # ``-c experiments/tune/demo.yaml`` outside a checkout: the sweep the package ships under that name
        sweep_path = shipped_experiment(sweep_path.as_posix()) or sweep_path
    if raw is None:
        raw = _read_sweep_file(sweep_path, source)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep file {source} must contain a mapping (name:, base:, search_space:, ...)")
    raw = copy.deepcopy(dict(raw))
    for text in overrides:
        _apply_override(raw, text, source)
    _check_top_keys(raw, source)
    return raw, sweep_path, source


def _read_sweep_file(sweep_path: Path | None, source: str) -> Any:
    if sweep_path is None:
        raise ConfigError("a sweep needs a YAML file: dyrep-ray tune -c experiments/tune/demo.yaml")
    if not sweep_path.is_file():
        raise ConfigError(f"sweep file {source} not found")
    try:
        return yaml.safe_load(sweep_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sweep file {source} is not UTF-8 text; pass a YAML file") from None
    except RecursionError:
        raise ConfigError(f"sweep file {source}: nests collections too deeply to read") from None


def _apply_override(raw: dict, text: str, source: str) -> None:
    """``--set`` for sweeps: TrainConfig keys go to ``config``; sweep keys (dotted for nesting) to the sweep."""
    key, value = parse_override(text)
    if key.startswith("config."):
        raw.setdefault("config", {})[key[len("config."):]] = value
        return
    head, _, rest = key.partition(".")
    if head in TOP_KEYS and head not in ("config",):
        if not rest:
            raw[head] = value
            return
        node = raw.setdefault(head, {})
        parts = rest.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text!r}: {head} is not a mapping in {source}")
        node[parts[-1]] = value
        return
    if key in field_names():
        raw.setdefault("config", {})[key] = value
        return
    raise ConfigError(f"--set {text!r}: unknown key {key!r}{closest(key, [*TOP_KEYS, *field_names()])}")


def _check_top_keys(raw: Mapping[str, Any], source: str) -> None:
    for key in raw:
        if key not in TOP_KEYS:
            hint = closest(key, TOP_KEYS)
            if key in field_names():
                hint = f"; {key!r} is an experiment config key: put it under 'config:'"
            raise ConfigError(f"sweep file {source}: unknown key {key!r}{hint}")


def base_config(raw: Mapping[str, Any], sweep_path: Path | None, source: str) -> dict:
    """The experiment config every trial starts from: ``base`` file < ``config`` overrides, as a dict."""
    inline = raw.get("config") or {}
    if not isinstance(inline, Mapping):
        raise ConfigError(f"sweep file {source}: 'config' must be a mapping of experiment keys, "
                          f"got {short_repr(inline)}")
    base_path = _resolve_base_path(raw["base"], sweep_path) if raw.get("base") is not None else None
    try:
        cfg = load_config(base_path)
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **inline}) if inline else cfg
    except ConfigError as exc:
        raise ConfigError(f"sweep file {source}: {'config' if base_path is None else 'base/config'}: {exc}") from None
    return cfg.to_dict()


def _resolve_base_path(base: Any, sweep_path: Path | None) -> Path:
    if not isinstance(base, (str, os.PathLike)) or not str(base).strip():
        raise ConfigError(f"sweep file {sweep_path}: 'base' must be a path to an experiment YAML, "
                          f"got {short_repr(base)}")
    candidate = Path(base).expanduser()
    places = [candidate] if candidate.is_absolute() else [
        *([sweep_path.parent / candidate] if sweep_path else []), Path.cwd() / candidate]
    for place in places:
        if place.is_file():
            return place
    shipped = None if candidate.is_absolute() else shipped_experiment(candidate.as_posix())
    if shipped is not None:  # e.g. ``base: experiments/cifar10_vgg16.yaml`` from a sweep file anywhere
        return shipped
    raise ConfigError(f"sweep file {sweep_path}: base config {str(base)!r} not found (looked in "
                      f"{', '.join(str(p.parent) for p in places)} and the package's experiments/); give a path "
                      "relative to the sweep file")
