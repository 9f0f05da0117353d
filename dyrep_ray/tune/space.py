"""Search spaces: the distributions of a sweep file, checked against the base config, and their Ray Tune objects.

``search_space:`` (and PBT's ``hyperparam_mutations:``) map config keys to one distribution each::

    lr: {loguniform: [0.01, 0.2]}
    dyrep_metric: {choice: [synflow, snip]}
    dyrep_adjust_interval: {randint: [5, 21]}     # integers in [low, high)  (Ray Tune semantics)
    dyrep_grow_topk: {grid: [1, 2]}               # every value, for each of num_samples

Every value a distribution can produce must make a valid TrainConfig; problems raise
:class:`~dyrep_ray.engine.config.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.config import ConfigError, TrainConfig, field_names, numeric_type, short_repr, type_text
from .sections import closest

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
_DIST_ALIASES = {"grid_search": "grid", "categorical": "choice", "log_uniform": "loguniform"}
#: Keys a trial cannot vary: its resources and storage belong to the sweep.
UNSEARCHABLE_KEYS = ("workers", "use_gpu", "storage_path")


def _number(value: Any) -> float | None:
    """YAML 1.1 reads ``1e-4`` as a string: accept it as a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Distribution:
    """One search dimension: ``kind`` in :data:`DISTRIBUTIONS`, ``values`` (choice/grid) or ``low``/``high``."""

    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    # ---- Ray Tune objects ------------------------------------------------------------------------------------
    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))

    def to_mutation(self):
        """What PBT perturbs with: a list (shift to a neighbour / resample) or a Tune domain (x0.8 / x1.2)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        return self.to_tune()

    def clamp(self, value: Any) -> Any:
        """``value`` forced back into this distribution's range (PBT's x1.2 may leave it); ints stay ints."""
        if self.kind in ("choice", "grid"):
            return value
        if self.kind == "randint":
            return int(min(max(round(float(value)), int(self.low)), int(self.high) - 1))
        return float(min(max(float(value), self.low), self.high))

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind}{list(self.values)}"
        return f"{self.kind}[{self.low:g}, {self.high:g}]"

    def to_json(self) -> dict:
        if self.kind in ("choice", "grid"):
            return {self.kind: list(self.values)}
        return {self.kind: [self.low, self.high]}



def parse_distribution(where: str, spec: Any, source: str) -> Distribution:
    """One ``{kind: args}`` mapping as a :class:`Distribution` (its own rules only; not yet the config's)."""
    example = "e.g. lr: {loguniform: [1.0e-3, 0.1]} or dyrep_metric: {choice: [synflow, snip]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"sweep file {source}: {where} must be one distribution mapping "
                          f"({', '.join(DISTRIBUTIONS)}), got {short_repr(spec)}; {example}")
    (kind, args), = spec.items()
    kind = _DIST_ALIASES.get(kind, kind)
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"sweep file {source}: {where}: unknown distribution {kind!r}{hint}; "
                          f"use one of {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"sweep file {source}: {where}: {kind} needs a non-empty list of values, "
                              f"got {short_repr(args)}")
        return Distribution(kind, values=tuple(args))
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise ConfigError(f"sweep file {source}: {where}: {kind} needs [low, high], got {short_repr(args)}")
    low, high = (_number(a) for a in args)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"sweep file {source}: {where}: {kind} bounds must be numbers, got {short_repr(list(args))}")
    if not low < high:
        raise ConfigError(f"sweep file {source}: {where}: {kind} needs low < high, got [{low:g}, {high:g}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"sweep file {source}: {where}: loguniform needs 0 < low < high, got [{low:g}, {high:g}]")
    if kind == "randint" and (low != int(low) or high != int(high)):
        raise ConfigError(f"sweep file {source}: {where}: randint bounds must be integers "
                          f"(values in [low, high)), got [{low:g}, {high:g}]")
    return Distribution(kind, low=low, high=high)


def _check_against_config(key: str, dist: Distribution, base: dict, source: str, where: str) -> Distribution:
    """Every value a distribution can produce must make a valid TrainConfig; choice values are normalized."""
    def valid(value: Any) -> Any:
        try:
            return TrainConfig.from_dict({**base, key: value}).to_dict()[key]
        except ConfigError as exc:
            raise ConfigError(f"sweep file {source}: {where}: value {short_repr(value)} is invalid: {exc}") from None

    if dist.kind in ("choice", "grid"):
        return Distribution(dist.kind, values=tuple(valid(v) for v in dist.values))
    kind = numeric_type(key)
    if kind is None:
        hint = type_text(key).removeprefix("an ").removeprefix("a ")
        raise ConfigError(f"sweep file {source}: {where}: {key!r} is not a number key ({hint}); "
                          f"use choice or grid")
    if kind is int and dist.kind in ("uniform", "loguniform"):
        raise ConfigError(f"sweep file {source}: {where}: {key!r} is an integer key; use randint: [low, high) "
                          f"or choice instead of {dist.kind}")
    valid(dist.low if dist.kind != "randint" else int(dist.low))
    valid(dist.high if dist.kind != "randint" else int(dist.high) - 1)
    return dist


def _config_key(key: Any, where: str, source: str) -> str:
    if key not in field_names():
        raise ConfigError(f"sweep file {source}: {where}: unknown config key {key!r}"
                          f"{closest(key, list(field_names()))}")
    return key


def distributions(raw: Any, base: dict, source: str, where: str,
                  name_key: bool = False) -> dict[str, Distribution]:
    """A mapping of config keys to distributions, each checked against the base config.

    ``name_key``: an unknown key's message names ``where.key`` (not just ``where``).
    """
    out: dict[str, Distribution] = {}
    for key, spec in raw.items():
        _config_key(key, f"{where}.{key}" if name_key else where, source)
        if key in UNSEARCHABLE_KEYS:
            raise ConfigError(f"sweep file {source}: {where}.{key}: per-trial resources and storage are not "
                              f"searchable; set them under 'resources:' / with --output")
        at = f"{where}.{key}"
        out[key] = _check_against_config(key, parse_distribution(at, spec, source), base, source, at)
    return out
