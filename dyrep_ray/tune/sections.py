"""The declared sections of a sweep file (``resources``, ``scheduler``, ``search_alg``, the counts) and their checker.

Each section is a dataclass whose rules are declared with the config's :func:`option`, checked by the same
:func:`~dyrep_ray.engine.config.check_field` as every config key; :func:`parse_section` words a problem for the sweep
file (``scheduler.grace_period must be an integer >= 1, got 0``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from ..engine.config import ConfigError, FieldProblem, Rule, check_field, field_rule, option


def closest(key: Any, valid: Sequence[str]) -> str:
    """The hint an unknown-key message ends with: `` (did you mean 'x'?)`` or the list of valid keys."""
    close = [v for v in valid if str(key) and v.startswith(str(key))][:1]
    close = close or difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"


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
    hyperparam_mutations: Any = option(None)  # key -> distribution; spec.py checks it against the config


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


SCHEDULER_SECTIONS = {"fifo": Fifo, "asha": Asha, "pbt": Pbt}
SCHEDULER_KEYS = {kind: tuple(f.name for f in fields(cls)) for kind, cls in SCHEDULER_SECTIONS.items()}
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


def parse_section(cls: type, raw: Any, where: str, source: str, defaults: Mapping[str, Any] | None = None,
                  unknown_suffix: str = "") -> Any:
    """An instance of the declared section ``cls`` from a mapping; messages name ``where.key`` in ``source``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep file {source}: '{where}' must be a mapping ({', '.join(keys_of(cls))})")
    names = keys_of(cls)
    for key in raw:
        if key not in names:
            raise ConfigError(f"sweep file {source}: unknown key {_dotted(where, key)}{unknown_suffix}"
                              f"{closest(key, names)}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = raw.get(f.name, dict(defaults or {}).get(f.name, f.default))
        try:
            values[f.name] = check_field(hints[f.name], field_rule(f), value)
        except FieldProblem as problem:
            what = _what_it_must_be(hints[f.name], field_rule(f), problem.detail or field_rule(f).bounds.text())
            raise ConfigError(f"sweep file {source}: {_dotted(where, f.name)} must be {what}, got {value!r}") from None
    return cls(**values)


def keys_of(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _dotted(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
