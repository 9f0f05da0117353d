"""Sweep files: parse, validate and resolve a ``dyrep-ray tune`` YAML (pure Python + PyYAML; no Ray, no torch).

A sweep file::

    name: cifar10-vgg16-asha            # default sweep name (``--name`` wins); the sweep dir is <output>/<name>
    base: ../cifar10_vgg16.yaml         # experiment config: relative to this file, the cwd or the repo root
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
key and the fix (unknown keys get the closest valid name).
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..engine.config import ConfigError, TrainConfig, load_config, parse_override

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
RESOURCE_KEYS = ("workers", "use_gpu", "cpus_per_worker")
SCHEDULER_KEYS = {
    "fifo": ("type",),
    "asha": ("type", "max_t", "grace_period", "reduction_factor", "brackets"),
    "pbt": ("type", "perturbation_interval", "burn_in_period", "quantile_fraction", "resample_probability",
            "perturbation_factors", "hyperparam_mutations", "synch"),
}
SEARCH_ALG_KEYS = ("type", "seed")
#: The time axis of ASHA / PBT: the 1-based epoch every report carries (continues across PBT exploits).
TIME_ATTR = "epoch"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _closest(key: Any, valid: Sequence[str]) -> str:
    close = [v for v in valid if str(key) and v.startswith(str(key))][:1]
    close = close or difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"


def _number(value: Any) -> Optional[float]:
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
    name: Optional[str]
    base_config: dict
    search_space: dict[str, Distribution]
    metric: str = "val_top1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: Optional[int] = None
    workers: int = 1
    use_gpu: Optional[bool] = None
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
    def from_json(cls, text: str) -> "SweepSpec":
        data = json.loads(text)
        data["search_space"] = {k: _parse_distribution(f"search_space.{k}", v, "sweep.json")
                                for k, v in data["search_space"].items()}
        data["mutations"] = {k: _parse_distribution(f"mutations.{k}", v, "sweep.json")
                             for k, v in data["mutations"].items()}
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------


def _parse_distribution(where: str, spec: Any, source: str) -> Distribution:
    example = "e.g. lr: {loguniform: [1.0e-3, 0.1]} or dyrep_metric: {choice: [synflow, snip]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"sweep file {source}: {where} must be one distribution mapping "
                          f"({', '.join(DISTRIBUTIONS)}), got {spec!r}; {example}")
    (kind, args), = spec.items()
    kind = _DIST_ALIASES.get(kind, kind)
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"sweep file {source}: {where}: unknown distribution {kind!r}{hint}; "
                          f"use one of {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"sweep file {source}: {where}: {kind} needs a non-empty list of values, got {args!r}")
        return Distribution(kind, values=tuple(args))
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise ConfigError(f"sweep file {source}: {where}: {kind} needs [low, high], got {args!r}")
    low, high = (_number(a) for a in args)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"sweep file {source}: {where}: {kind} bounds must be numbers, got {list(args)!r}")
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
            return getattr(TrainConfig.from_dict({**base, key: value}), key)
        except ConfigError as exc:
            raise ConfigError(f"sweep file {source}: {where}: value {value!r} is invalid: {exc}") from None

    if dist.kind in ("choice", "grid"):
        return Distribution(dist.kind, values=tuple(valid(v) for v in dist.values))
    hint = str(TrainConfig.__annotations__.get(key, "")).replace("Optional[", "").rstrip("]")
    if hint not in ("int", "float"):
        raise ConfigError(f"sweep file {source}: {where}: {key!r} is not a number key ({hint}); "
                          f"use choice or grid")
    if hint == "int" and dist.kind in ("uniform", "loguniform"):
        raise ConfigError(f"sweep file {source}: {where}: {key!r} is an integer key; use randint: [low, high) "
                          f"or choice instead of {dist.kind}")
    valid(dist.low if dist.kind != "randint" else int(dist.low))
    valid(dist.high if dist.kind != "randint" else int(dist.high) - 1)
    return dist


def _resolve_base_path(base: Any, sweep_path: Optional[Path]) -> Path:
    if not isinstance(base, (str, os.PathLike)) or not str(base).strip():
        raise ConfigError(f"sweep file {sweep_path}: 'base' must be a path to an experiment YAML, got {base!r}")
    candidate = Path(base).expanduser()
    places = [candidate] if candidate.is_absolute() else [
        *([sweep_path.parent / candidate] if sweep_path else []), Path.cwd() / candidate, REPO_ROOT / candidate]
    for place in places:
        if place.is_file():
            return place
    raise ConfigError(f"sweep file {sweep_path}: base config {str(base)!r} not found (looked in "
                      f"{', '.join(str(p.parent) for p in places)}); give a path relative to the sweep file")


def _int(source: str, where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"sweep file {source}: {where} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(source: str, where: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    number = _number(value)
    if number is None or not (lo < number if lo_open else lo <= number) or number > hi:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"sweep file {source}: {where} must be a number in {bracket}{lo:g}, {hi:g}], got {value!r}")
    return number


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
    if key in TrainConfig.__dataclass_fields__:
        raw.setdefault("config", {})[key] = value
        return
    raise ConfigError(f"--set {text!r}: unknown key {key!r}"
                      f"{_closest(key, [*TOP_KEYS, *TrainConfig.__dataclass_fields__])}")


def load_sweep(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = (), *,
               raw: Optional[Mapping[str, Any]] = None) -> SweepSpec:
    """Parse and validate a sweep YAML (or an already-parsed mapping ``raw``), with ``--set`` overrides."""
    sweep_path = Path(path) if path is not None else None
    source = str(sweep_path) if sweep_path is not None else "<inline>"
    if raw is None:
        if sweep_path is None:
            raise ConfigError("a sweep needs a YAML file: dyrep-ray tune -c experiments/tune/demo.yaml")
        if not sweep_path.is_file():
            raise ConfigError(f"sweep file {source} not found")
        try:
            raw = yaml.safe_load(sweep_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"sweep file {source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep file {source} must contain a mapping (name:, base:, search_space:, ...)")
    raw = copy.deepcopy(dict(raw))
    for text in overrides:
        _apply_override(raw, text, source)
    for key in raw:
        if key not in TOP_KEYS:
            hint = _closest(key, TOP_KEYS)
            if key in TrainConfig.__dataclass_fields__:
                hint = f"; {key!r} is an experiment config key: put it under 'config:'"
            raise ConfigError(f"sweep file {source}: unknown key {key!r}{hint}")

    # -- the base experiment config ----------------------------------------------------------------------------
    inline = raw.get("config") or {}
    if not isinstance(inline, Mapping):
        raise ConfigError(f"sweep file {source}: 'config' must be a mapping of experiment keys, got {inline!r}")
    base_path = _resolve_base_path(raw["base"], sweep_path) if raw.get("base") is not None else None
    try:
        cfg = load_config(base_path)
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **inline}) if inline else cfg
    except ConfigError as exc:
        raise ConfigError(f"sweep file {source}: {'config' if base_path is None else 'base/config'}: {exc}") from None
    base = cfg.to_dict()

    # -- resources ----------------------------------------------------------------------------------------------
    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise ConfigError(f"sweep file {source}: 'resources' must be a mapping ({', '.join(RESOURCE_KEYS)})")
    for key in resources:
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"sweep file {source}: unknown key resources.{key}{_closest(key, RESOURCE_KEYS)}")
    workers = _int(source, "resources.workers", resources.get("workers", base["workers"]), 1)
    use_gpu = resources.get("use_gpu", base["use_gpu"])
    if use_gpu is not None and not isinstance(use_gpu, bool):
        raise ConfigError(f"sweep file {source}: resources.use_gpu must be true, false or null, got {use_gpu!r}")
    cpus_per_worker = _float(source, "resources.cpus_per_worker", resources.get("cpus_per_worker", 1), 0, 1024,
                             lo_open=True)

    # -- search space -------------------------------------------------------------------------------------------
    space_raw = raw.get("search_space") or {}
    if not isinstance(space_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'search_space' must map config keys to distributions")
    space: dict[str, Distribution] = {}
    for key, spec in space_raw.items():
        if key not in TrainConfig.__dataclass_fields__:
            raise ConfigError(f"sweep file {source}: search_space: unknown config key {key!r}"
                              f"{_closest(key, list(TrainConfig.__dataclass_fields__))}")
        if key in ("workers", "use_gpu", "storage_path"):
            raise ConfigError(f"sweep file {source}: search_space.{key}: per-trial resources and storage are not "
                              f"searchable; set them under 'resources:' / with --output")
        where = f"search_space.{key}"
        space[key] = _check_against_config(key, _parse_distribution(where, spec, source), base, source, where)

    # -- objective ----------------------------------------------------------------------------------------------
    metric = raw.get("metric", "val_top1")
    if metric not in KNOWN_METRICS:
        raise ConfigError(f"sweep file {source}: unknown metric {metric!r}{_closest(metric, KNOWN_METRICS)}")
    if metric.startswith("ema_") and not base["model_ema"]:
        raise ConfigError(f"sweep file {source}: metric {metric!r} needs model_ema: true under 'config:'")
    mode = raw.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep file {source}: mode must be 'max' or 'min', got {mode!r}")
    num_samples = _int(source, "num_samples", raw.get("num_samples", 1), 1)
    max_concurrent = raw.get("max_concurrent_trials")
    if max_concurrent is not None:
        max_concurrent = _int(source, "max_concurrent_trials", max_concurrent, 1)
    max_failures = _int(source, "max_failures", raw.get("max_failures", 0), 0)

    # -- scheduler ----------------------------------------------------------------------------------------------
    sched_raw = raw.get("scheduler") or {"type": "fifo"}
    if isinstance(sched_raw, str):
        sched_raw = {"type": sched_raw}
    if not isinstance(sched_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'scheduler' must be a mapping with 'type' ({', '.join(SCHEDULERS)})")
    sched_type = str(sched_raw.get("type", "fifo")).lower()
    if sched_type == "none":
        sched_type = "fifo"
    if sched_type not in SCHEDULERS:
        close = difflib.get_close_matches(sched_type, SCHEDULERS, n=1, cutoff=0.4)
        raise ConfigError(f"sweep file {source}: unknown scheduler {sched_type!r}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; use one of {', '.join(SCHEDULERS)}")
    for key in sched_raw:
        if key not in SCHEDULER_KEYS[sched_type]:
            raise ConfigError(f"sweep file {source}: unknown key scheduler.{key} for {sched_type}"
                              f"{_closest(key, SCHEDULER_KEYS[sched_type])}")
    scheduler: dict[str, Any] = {"type": sched_type}
    mutations: dict[str, Distribution] = {}
    epochs = base["epochs"]
    if sched_type == "asha":
        scheduler["max_t"] = _int(source, "scheduler.max_t", sched_raw.get("max_t", epochs), 1)
        scheduler["grace_period"] = _int(source, "scheduler.grace_period", sched_raw.get("grace_period", 1), 1)
        scheduler["reduction_factor"] = _float(source, "scheduler.reduction_factor",
                                               sched_raw.get("reduction_factor", 3), 1, 1e6, lo_open=True)
        scheduler["brackets"] = _int(source, "scheduler.brackets", sched_raw.get("brackets", 1), 1)
        if scheduler["grace_period"] > scheduler["max_t"]:
            raise ConfigError(f"sweep file {source}: scheduler.grace_period ({scheduler['grace_period']}) must be "
                              f"<= scheduler.max_t ({scheduler['max_t']})")
    elif sched_type == "pbt":
        scheduler["perturbation_interval"] = _int(
            source, "scheduler.perturbation_interval",
            sched_raw.get("perturbation_interval", base["dyrep_adjust_interval"]), 1)
        scheduler["burn_in_period"] = _int(source, "scheduler.burn_in_period", sched_raw.get("burn_in_period", 0), 0)
        scheduler["quantile_fraction"] = _float(source, "scheduler.quantile_fraction",
                                                sched_raw.get("quantile_fraction", 0.25), 0, 0.5, lo_open=True)
        scheduler["resample_probability"] = _float(source, "scheduler.resample_probability",
                                                   sched_raw.get("resample_probability", 0.25), 0, 1)
        factors = sched_raw.get("perturbation_factors", [1.2, 0.8])
        if (not isinstance(factors, (list, tuple)) or len(factors) != 2
                or any(_number(f) is None or _number(f) <= 0 for f in factors)):
            raise ConfigError(f"sweep file {source}: scheduler.perturbation_factors must be two positive numbers, "
                              f"got {factors!r}")
        scheduler["perturbation_factors"] = [_number(f) for f in factors]
        synch = sched_raw.get("synch", False)
        if not isinstance(synch, bool):
            raise ConfigError(f"sweep file {source}: scheduler.synch must be true or false, got {synch!r}")
        scheduler["synch"] = synch
        mut_raw = sched_raw.get("hyperparam_mutations")
        if mut_raw is None:  # grid dimensions seed the population and then mutate among their values
            mutations = dict(space)
        else:
            if not isinstance(mut_raw, Mapping) or not mut_raw:
                raise ConfigError(f"sweep file {source}: scheduler.hyperparam_mutations must map config keys to "
                                  f"distributions")
            for key, spec in mut_raw.items():
                where = f"scheduler.hyperparam_mutations.{key}"
                if key not in TrainConfig.__dataclass_fields__:
                    raise ConfigError(f"sweep file {source}: {where}: unknown config key {key!r}"
                                      f"{_closest(key, list(TrainConfig.__dataclass_fields__))}")
                dist = _check_against_config(key, _parse_distribution(where, spec, source), base, source, where)
                if dist.kind == "grid":
                    raise ConfigError(f"sweep file {source}: {where}: PBT cannot mutate with grid; use choice")
                mutations[key] = dist
                if key not in space:  # every mutated key needs an initial value per trial
                    space[key] = dist
        if not mutations:
            raise ConfigError(f"sweep file {source}: scheduler pbt needs something to mutate: a search_space "
                              f"key or scheduler.hyperparam_mutations")
        every = base["checkpoint_every"]
        if scheduler["perturbation_interval"] % every or scheduler["burn_in_period"] % every:
            raise ConfigError(f"sweep file {source}: PBT exploits checkpoints: scheduler.perturbation_interval "
                              f"({scheduler['perturbation_interval']}) and burn_in_period must be multiples of "
                              f"checkpoint_every ({every})")
    if not space:
        raise ConfigError(f"sweep file {source}: search_space is empty; add e.g. "
                          f"dyrep_cut_threshold: {{uniform: [0.05, 0.3]}}")

    # -- search algorithm ---------------------------------------------------------------------------------------
    alg_raw = raw.get("search_alg") or {"type": "random"}
    if isinstance(alg_raw, str):
        alg_raw = {"type": alg_raw}
    if not isinstance(alg_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'search_alg' must be a mapping with 'type' "
                          f"({', '.join(SEARCH_ALGS)})")
    for key in alg_raw:
        if key not in SEARCH_ALG_KEYS:
            raise ConfigError(f"sweep file {source}: unknown key search_alg.{key}{_closest(key, SEARCH_ALG_KEYS)}")
    alg_type = str(alg_raw.get("type", "random")).lower()
    if alg_type not in SEARCH_ALGS:
        raise ConfigError(f"sweep file {source}: unknown search_alg {alg_type!r}"
                          f"{_closest(alg_type, SEARCH_ALGS)}")
    seed = alg_raw.get("seed")
    if seed is not None:
        seed = _int(source, "search_alg.seed", seed, 0)
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

    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
        raise ConfigError(f"sweep file {source}: name must be a non-empty string without '/', got {name!r}")
    description = raw.get("description") or ""
    return SweepSpec(source=source, name=name, base_config=base, search_space=space, metric=metric, mode=mode,
                     num_samples=num_samples, max_concurrent_trials=max_concurrent, workers=workers,
                     use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, scheduler=scheduler, mutations=mutations,
                     search_alg={"type": alg_type, "seed": seed}, max_failures=max_failures,
                     description=str(description))
