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
key and the fix (unknown keys get the closest valid name). This module turns the sections into a
:class:`SweepSpec`; :mod:`.sweep_file` reads the YAML and its base config, :mod:`.space` parses the distributions,
:mod:`.sections` declares the other sections (their rules are the config's :func:`option`, checked by the same
:func:`~dyrep_ray.engine.config.check_field` as every config key).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.config import ConfigError, TrainConfig, short_repr
from .sections import SCHEDULER_SECTIONS, Counts, Pbt, Resources, SearchAlg, closest, keys_of, parse_section
from .space import Distribution, distributions, parse_distribution
from .sweep_file import base_config, read_sweep

#: Metrics every epoch reports (``ema_*`` too when ``model_ema`` is on) that a sweep may optimize.
KNOWN_METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "ema_val_top1", "ema_val_top5", "ema_val_loss",
                 "params", "n_blocks", "images_per_s", "epoch_time_s")
SCHEDULERS = ("fifo", "asha", "pbt")
SEARCH_ALGS = ("random", "optuna", "hyperopt")
#: The time axis of ASHA / PBT: the 1-based epoch every report carries (continues across PBT exploits).
TIME_ATTR = "epoch"


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
        data["search_space"] = {k: parse_distribution(f"search_space.{k}", v, "sweep.json")
                                for k, v in data["search_space"].items()}
        data["mutations"] = {k: parse_distribution(f"mutations.{k}", v, "sweep.json")
                             for k, v in data["mutations"].items()}
        return cls(**data)


def _resources(raw: Mapping[str, Any], base: dict, source: str) -> Resources:
    workers = base["workers"]
    defaults = {"workers": max(workers) if isinstance(workers, list) else workers, "use_gpu": base["use_gpu"]}
    return parse_section(Resources, raw.get("resources") or {}, "resources", source, defaults)


def _objective(raw: Mapping[str, Any], base: dict, source: str) -> tuple[str, str]:
    metric = raw.get("metric", "val_top1")
    if metric not in KNOWN_METRICS:
        raise ConfigError(f"sweep file {source}: unknown metric {short_repr(metric)}{closest(metric, KNOWN_METRICS)}")
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
    section = parse_section(SCHEDULER_SECTIONS[sched_type], {**sched_raw, "type": sched_type}, "scheduler", source,
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
        mutations = distributions(mut_raw, base, source, "scheduler.hyperparam_mutations", name_key=True)
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
    alg = parse_section(SearchAlg, {**alg_raw, "type": alg_type}, "search_alg", source)
    if alg_type not in SEARCH_ALGS:
        raise ConfigError(f"sweep file {source}: unknown search_alg {alg_type!r}{closest(alg_type, SEARCH_ALGS)}")
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
    raw, sweep_path, source = read_sweep(path, overrides, raw)
    base = base_config(raw, sweep_path, source)
    resources = _resources(raw, base, source)
    space_raw = raw.get("search_space") or {}
    if not isinstance(space_raw, Mapping):
        raise ConfigError(f"sweep file {source}: 'search_space' must map config keys to distributions")
    space = distributions(space_raw, base, source, "search_space")
    metric, mode = _objective(raw, base, source)
    counts = parse_section(Counts, {k: raw[k] for k in keys_of(Counts) if k in raw}, "", source)
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
