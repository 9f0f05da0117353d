"""Sweep files: parse, validate and resolve a ``dyrep-ray tune`` YAML (pure Python + PyYAML; no Ray, no torch).

A sweep file::

    name: cifar10-vgg16-asha            # default sweep name (``--name`` wins); the sweep dir is <output>/<name>
    base: ../cifar10_vgg16.yaml         # experiment config: relative to this file or the cwd, or shipped
    config:                             # overrides of the base config (TrainConfig keys), applied to every trial
      epochs: 120
    search_space:                       # any TrainConfig key -> one distribution
      dyrep_cut_threshold: {uniform: [0.05, 0.3]}
      lr: {loguniform: [0.01, 0.2]}
      dyrep_metric: {choice: [synflow, snip]}
      dyrep_adjust_interval: {randint: [5, 21]}     # integers in [low, high)  (Ray Tune semantics)
      dyrep_grow_topk: {grid: [1, 2]}               # every value, for each of num_samples
    metric: val_top1                    # default val_top1; mode defaults to max (min for *loss metrics)
    mode: max
    num_samples: 8
    max_concurrent_trials: 2            # default: as many as the cluster can run at once
    resources: {workers: 1, use_gpu: true, cpus_per_worker: 1}   # per trial; default: the config's workers/use_gpu
    scheduler: {type: asha, grace_period: 10, reduction_factor: 3, max_t: 120}
    #   or {type: pbt, perturbation_interval: 15, quantile_fraction: 0.25, resample_probability: 0.25,
    #       hyperparam_mutations: {lr: {loguniform: [0.01, 0.2]}}}     # default: the whole search space
    #       (numbers are multiplied by 0.8 / 1.2 and clamped to their range, or resampled; choice / grid values
    #       move to a neighbour or are resampled); synch: true waits for the whole population at each step
    #   or {type: fifo} (the default: every trial runs to the end)
    search_alg: {type: random, seed: 0} # random (default), optuna / hyperopt when those packages are installed
    max_failures: 0                     # Tune-level retries of an errored trial (Ray Train retries workers itself)

Every problem raises :class:`~dyrep_ray.engine.config.ConfigError` with a one-line message naming the file, the
key and the fix (unknown keys get the closest valid name). The sections (``resources``, ``scheduler``,
``search_alg``, the counts) are dataclasses whose rules are declared with the config's :func:`option`, checked by
the same :func:`~dyrep_ray.engine.config.check_field` as every config key.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..engine.config import (
    ConfigError,
    FieldProblem,
    Rule,
    TrainConfig,
    check_field,
    field_names,
    field_rule,
    load_config,
    numeric_type,
    option,
    parse_override,
    short_repr,
    type_text,
)
from ..package_data import shipped_experiment

logger = logging.getLogger(__name__)

#: Metrics every epoch reports (``ema_*`` too when ``model_ema`` is on) that a sweep may optimize.
KNOWN_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "ema_val_top1", "ema_val_top5", "ema_val_loss",
                 "params", "n_blocks", "images_per_s", "epoch_time_s")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
_DIST_ALIASES = {"grid_search": "grid", "categorical": "choice", "log_uniform": "loguniform"}
SCHEDULERS = ("fifo", "asha", "pbt")
SEARCH_ALGS = ("random", "optuna", "hyperopt")
TOP_KEYS = ("name", "description", "base", "config", "search_space", "metric", "mode", "num_samples",
            "max_concurrent_trials", "resources", "scheduler", "search_alg", "max_failures")
#: The time axis of ASHA / PBT: the 1-based epoch every report carries (continues across PBT exploits).
TIME_ATTR = "epoch"


def _closest(key: Any, valid: Sequence[str]) -> str:
    close = [v for v in valid if str(key) and v.startswith(str(key))][:1]
    close = close or difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"


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


@dataclass
class SweepSpec:
    """A validated sweep (see module docstring); ``base_config`` is a complete, valid TrainConfig dict."""

    source: str
    name: str | None
    base_config: dict
    search_space: dict[str, Distribution]
    metric: str = "val_top1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    mutations: dict[str, Distribution] = field(default_factory=dict)
    search_alg: dict = field(default_factory=lambda: {"type": "random", "seed": None})
    max_failures: int = 0
    description: str = ""

    @property
    def scheduler_type(self) -> str:
        return self.scheduler["type"]

    @property
    def epochs(self) -> int:
        return int(self.base_config["epochs"])

    def trial_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: base config + sampled values (+ per-trial resources)."""
        values = dict(self.base_config)
        for key, value in sampled.items():
            dist = self.search_space.get(key) or self.mutations.get(key)
            values[key] = dist.clamp(value) if dist is not None else value
        values.update(workers=self.workers, use_gpu=self.use_gpu, storage_path=None)
        return TrainConfig.from_dict(values)

    def param_space(self) -> dict:
        return {key: dist.to_tune() for key, dist in self.search_space.items()}

    def searched_keys(self) -> list[str]:
        return list(self.search_space)

    # ---- persistence (sweep.json in the sweep dir, used by --resume) --------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data["search_space"] = {k: d.to_json() for k, d in self.search_space.items()}
        data["mutations"] = {k: d.to_json() for k, d in self.mutations.items()}
        return json.dumps(data, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        data = json.loads(text)
        data["search_space"] = {k: _parse_distribution(f"search_space.{k}", v, "sweep.json")
                                for k, v in data["search_space"].items()}
        data["mutations"] = {k: _parse_distribution(f"mutations.{k}", v, "sweep.json")
                             for k, v in data["mutations"].items()}
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# sections declared with the config's option() rules (one validation mechanism for configs and sweeps)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """``resources:`` -- per trial; defaults come from the base config (``workers``: its max when elastic)."""

    workers: int = option(1, ge=1)
    use_gpu: bool | None = option(None, must="true, false or null")
    cpus_per_worker: float = option(1.0, gt=0, le=1024)


@dataclass(frozen=True)
class Asha:
    """``scheduler: {type: asha, ...}``; ``max_t`` defaults to the base config's epochs."""

    type: str = option("asha")
    max_t: int = option(1, ge=1)
    grace_period: int = option(1, ge=1)
    reduction_factor: float = option(3.0, gt=1, le=1e6)
    brackets: int = option(1, ge=1)


@dataclass(frozen=True)
class Pbt:
    """``scheduler: {type: pbt, ...}``; ``perturbation_interval`` defaults to the config's adjust interval."""

    type: str = option("pbt")
    perturbation_interval: int = option(1, ge=1)
    burn_in_period: int = option(0, ge=0)
    quantile_fraction: float = option(0.25, gt=0, le=0.5)
    resample_probability: float = option(0.25, ge=0, le=1)
    perturbation_factors: list[float] = option((1.2, 0.8), length=2, gt=0, must="two positive numbers")
    synch: bool = option(False)
    hyperparam_mutations: Any = option(None)  # key -> distribution; checked against the config below


@dataclass(frozen=True)
class Fifo:
    type: str = option("fifo")


@dataclass(frozen=True)
class SearchAlg:
    type: str = option("random")
    seed: int | None = option(None, ge=0)


@dataclass(frozen=True)
class Counts:
    """The top-level numbers of a sweep file."""

    num_samples: int = option(1, ge=1)
    max_concurrent_trials: int | None = option(None, ge=1)
    max_failures: int = option(0, ge=0)


_SCHEDULER_SECTIONS = {"fifo": Fifo, "asha": Asha, "pbt": Pbt}
SCHEDULER_KEYS = {kind: tuple(f.name for f in fields(cls)) for kind, cls in _SCHEDULER_SECTIONS.items()}
RESOURCE_KEYS = tuple(f.name for f in fields(Resources))
SEARCH_ALG_KEYS = tuple(f.name for f in fields(SearchAlg))


def _what_it_must_be(hint: Any, rule: Rule, detail: str) -> str:
    """``an integer >= 1``, ``a number in (0, 0.5]``, ``true or false`` (or the declared ``must`` text)."""
    if rule.must:
        return rule.must
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    inner = args[0] if len(args) == 1 else hint  # Optional[X] -> X
    if inner is bool:
        return "true or false"
    noun = "an integer" if inner is int else "a number"
    return f"{noun} {detail}" if detail and detail != "any" else noun


def _section(cls: type, raw: Any, where: str, source: str, defaults: Mapping[str, Any] = (),
             unknown_suffix: str = "") -> Any:
    """An instance of the declared section ``cls`` from a mapping; messages name ``where.key`` in ``source``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep file {source}: '{where}' must be a mapping ({', '.join(_keys_of(cls))})")
    names = _keys_of(cls)
    for key in raw:
        if key not in names:
            raise ConfigError(f"sweep file {source}: unknown key {_dotted(where, key)}{unknown_suffix}"
                              f"{_closest(key, names)}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = raw.get(f.name, dict(defaults).get(f.name, f.default))
        try:
            values[f.name] = check_field(hints[f.name], field_rule(f), value)
        except FieldProblem as problem:
            what = _what_it_must_be(hints[f.name], field_rule(f), problem.detail or field_rule(f).bounds.text())
            raise ConfigError(f"sweep file {source}: {_dotted(where, f.name)} must be {what}, got {value!r}") from None
    return cls(**values)


def _keys_of(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _dotted(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# ---------------------------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------------------------


def _parse_distribution(where: str, spec: Any, source: str) -> Distribution:
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
                          f"{_closest(key, list(field_names()))}")
    return key


def _distributions(raw: Any, base: dict, source: str, where: str,
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
        out[key] = _check_against_config(key, _parse_distribution(at, spec, source), base, source, at)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the sweep file, piece by piece
# ---------------------------------------------------------------------------------------------------------------

UNSEARCHABLE_KEYS = ("workers", "use_gpu", "storage_path")


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
    raise ConfigError(f"--set {text!r}: unknown key {key!r}{_closest(key, [*TOP_KEYS, *field_names()])}")


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


def _check_top_keys(raw: Mapping[str, Any], source: str) -> None:
    for key in raw:
        if key not in TOP_KEYS:
            hint = _closest(key, TOP_KEYS)
            if key in field_names():
                hint = f"; {key!r} is an experiment config key: put it under 'config:'"
            raise ConfigError(f"sweep file {source}: unknown key {key!r}{hint}")


def _base_config(raw: Mapping[str, Any], sweep_path: Path | None, source: str) -> dict:
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


def _resources(raw: Mapping[str, Any], base: dict, source: str) -> Resources:
    workers = base["workers"]
    defaults = {"workers": max(workers) if isinstance(workers, list) else workers, "use_gpu": base["use_gpu"]}
    return _section(Resources, raw.get("resources") or {}, "resources", source, defaults)


def _objective(raw: Mapping[str, Any], base: dict, source: str) -> tuple[str, str]:
    metric = raw.get("metric", "val_top1")
    if metric not in KNOWN_METRICS:
        raise ConfigError(f"sweep file {source}: unknown metric {short_repr(metric)}{_closest(metric, KNOWN_METRICS)}")
    if metric.startswith("ema_") and not base["model_ema"]:
        raise ConfigError(f"sweep file {source}: metric {metric!r} needs model_ema: true under 'config:'")
    mode = raw.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep file {source}: mode must be 'max' or 'min', got {short_repr(mode)}")
    return metric, mode


def _scheduler_type(sched_raw: Any, source: str) -> str:
    if not isinstance(sched_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'scheduler' must be a mapping with 'type' ({', '.join(SCHEDULERS)})")
    sched_type = str(sched_raw.get("type", "fifo")).lower()
    sched_type = "fifo" if sched_type == "none" else sched_type
    if sched_type not in SCHEDULERS:
        close = difflib.get_close_matches(sched_type, SCHEDULERS, n=1, cutoff=0.4)
        raise ConfigError(f"sweep file {source}: unknown scheduler {sched_type!r}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; use one of {', '.join(SCHEDULERS)}")
    return sched_type


def _scheduler(raw: Mapping[str, Any], base: dict, space: dict[str, Distribution],
               source: str) -> tuple[dict, dict[str, Distribution]]:
    """The scheduler settings (a plain dict, as sweep.py builds it) and PBT's mutations (may extend ``space``)."""
    sched_raw = raw.get("scheduler") or {"type": "fifo"}
    sched_raw = {"type": sched_raw} if isinstance(sched_raw, str) else sched_raw
    sched_type = _scheduler_type(sched_raw, source)
    defaults = {"type": sched_type, "max_t": base["epochs"], "perturbation_interval": base["dyrep_adjust_interval"]}
    section = _section(_SCHEDULER_SECTIONS[sched_type], {**sched_raw, "type": sched_type}, "scheduler", source,
                       defaults, unknown_suffix=f" for {sched_type}")
    scheduler = {k: v for k, v in asdict(section).items() if k != "hyperparam_mutations"}
    if sched_type == "asha" and section.grace_period > section.max_t:
        raise ConfigError(f"sweep file {source}: scheduler.grace_period ({section.grace_period}) must be "
                          f"<= scheduler.max_t ({section.max_t})")
    if sched_type != "pbt":
        return scheduler, {}
    return scheduler, _pbt_mutations(section, base, space, source)


def _pbt_mutations(section: Pbt, base: dict, space: dict[str, Distribution], source: str) -> dict[str, Distribution]:
    mut_raw = section.hyperparam_mutations
    if mut_raw is None:  # grid dimensions seed the population and then mutate among their values
        mutations = dict(space)
    else:
        if not isinstance(mut_raw, Mapping) or not mut_raw:
            raise ConfigError(f"sweep file {source}: scheduler.hyperparam_mutations must map config keys to "
                              f"distributions")
        mutations = _distributions(mut_raw, base, source, "scheduler.hyperparam_mutations", name_key=True)
        for key, dist in mutations.items():
            if dist.kind == "grid":
                raise ConfigError(f"sweep file {source}: scheduler.hyperparam_mutations.{key}: PBT cannot mutate "
                                  f"with grid; use choice")
            space.setdefault(key, dist)  # every mutated key needs an initial value per trial
    if not mutations:
        raise ConfigError(f"sweep file {source}: scheduler pbt needs something to mutate: a search_space "
                          f"key or scheduler.hyperparam_mutations")
    every = base["checkpoint_every"]
    if section.perturbation_interval % every or section.burn_in_period % every:
        raise ConfigError(f"sweep file {source}: PBT exploits checkpoints: scheduler.perturbation_interval "
                          f"({section.perturbation_interval}) and burn_in_period must be multiples of "
                          f"checkpoint_every ({every})")
    return mutations


def _search_alg(raw: Mapping[str, Any], space: dict[str, Distribution], sched_type: str, source: str) -> dict:
    alg_raw = raw.get("search_alg") or {"type": "random"}
    alg_raw = {"type": alg_raw} if isinstance(alg_raw, str) else alg_raw
    if not isinstance(alg_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'search_alg' must be a mapping with 'type' "
                          f"({', '.join(SEARCH_ALGS)})")
    alg_type = str(alg_raw.get("type", "random")).lower()
    alg = _section(SearchAlg, {**alg_raw, "type": alg_type}, "search_alg", source)
    if alg_type not in SEARCH_ALGS:
        raise ConfigError(f"sweep file {source}: unknown search_alg {alg_type!r}{_closest(alg_type, SEARCH_ALGS)}")
    if alg_type != "random":
        import importlib.util

        if importlib.util.find_spec(alg_type) is None:
            raise ConfigError(f"sweep file {source}: search_alg {alg_type!r} needs the {alg_type} package "
                              f"(pip install {alg_type}); or use search_alg: {{type: random}}")
        if any(d.kind == "grid" for d in space.values()):
            raise ConfigError(f"sweep file {source}: search_alg {alg_type!r} cannot take grid dimensions; "
                              f"use choice")
        if sched_type == "pbt":
            raise ConfigError(f"sweep file {source}: scheduler pbt samples its own population; "
                              f"use search_alg: {{type: random}}")
    return {"type": alg.type, "seed": alg.seed}


def _name(raw: Mapping[str, Any], source: str) -> str | None:
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
        raise ConfigError(f"sweep file {source}: name must be a non-empty string without '/', got {short_repr(name)}")
    return name


def load_sweep(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
               raw: Mapping[str, Any] | None = None) -> SweepSpec:
    """Parse and validate a sweep YAML (or an already-parsed mapping ``raw``), with ``--set`` overrides."""
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

    base = _base_config(raw, sweep_path, source)
    resources = _resources(raw, base, source)
    space_raw = raw.get("search_space") or {}
    if not isinstance(space_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'search_space' must map config keys to distributions")
    space = _distributions(space_raw, base, source, "search_space")
    metric, mode = _objective(raw, base, source)
    counts = _section(Counts, {k: raw[k] for k in _keys_of(Counts) if k in raw}, "", source)
    scheduler, mutations = _scheduler(raw, base, space, source)
    if not space:
        raise ConfigError(f"sweep file {source}: search_space is empty; add e.g. "
                          f"dyrep_cut_threshold: {{uniform: [0.05, 0.3]}}")
    search_alg = _search_alg(raw, space, scheduler["type"], source)
    return SweepSpec(source=source, name=_name(raw, source), base_config=base, search_space=space, metric=metric,
                     mode=mode, num_samples=counts.num_samples, max_concurrent_trials=counts.max_concurrent_trials,
                     workers=resources.workers, use_gpu=resources.use_gpu, cpus_per_worker=resources.cpus_per_worker,
                     scheduler=scheduler, mutations=mutations, search_alg=search_alg,
                     max_failures=counts.max_failures, description=str(raw.get("description") or ""))
