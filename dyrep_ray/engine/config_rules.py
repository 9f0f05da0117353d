"""The rule language of dyrep-ray configuration: declaring a key, checking one value, wording its problem.

A key is a dataclass field declared with :func:`option` (``field(metadata=...)``): its bounds, example value for
messages, whether it must be a non-empty string, its resume policy and its one-line ``help``. :func:`check_field`
coerces and checks one value against its type hint and :class:`Rule`; a broken rule is a :class:`FieldProblem`,
worded for a config key by :func:`field_message` (tune/sections.py words it for sweep files its own way).
Enum-like keys are typed with a :class:`ConfigEnum` (a ``str`` Enum: equal to its string, written as a plain
string to JSON/YAML).

Pure Python, no knowledge of any particular schema: :mod:`dyrep_ray.engine.config_schema` declares the keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
import re
import reprlib
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from ..errors import UserError

#: The largest magnitude any integer config key takes (a key's own bounds may be tighter): beyond it a value only
#: overflows the C integers it reaches (``islice``, tensor shapes, RNG seeds) with a traceback.
MAX_INT = 2**31 - 1

__all__ = [
    "RESUME_ALLOW",
    "RESUME_REFUSE",
    "RULE_KEY",
    "Bounds",
    "ConfigEnum",
    "ConfigError",
    "FieldProblem",
    "Rule",
    "check_field",
    "coerce_scalar",
    "describe_type",
    "field_message",
    "field_rule",
    "is_enum",
    "option",
    "plain_value",
    "short_repr",
    "split_optional",
    "unknown_key_message",
    "yaml_value",
]

_MAX_REPR = 80
# reprlib limits for values quoted in messages: a few hundred bytes of nested YAML aliases expand to an
# exponentially large value, so only a bounded prefix of it is ever visited
_REPR_LEVELS = 3
_REPR_ITEMS = 6


class ConfigError(UserError, ValueError):
    """An invalid configuration. ``str(err)`` is one line naming the key (or file) and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


class ConfigEnum(enum.StrEnum):
    """An enum-like config value: a ``str`` (``Opt.SGD == "sgd"``), printed and serialized as its value."""

    def __repr__(self) -> str:
        return repr(self.value)


RESUME_REFUSE = "refuse"
RESUME_ALLOW = "allow"
_RESUME_POLICIES = (RESUME_REFUSE, RESUME_ALLOW)


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a value (or of every element of a list value)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __bool__(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def holds(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ``in (0, 0.5]`` ..."""
        low, low_open = (self.gt, True) if self.gt is not None else (self.ge, False)
        high, high_open = (self.lt, True) if self.lt is not None else (self.le, False)
        if low is not None and high is not None:
            return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
        if low is not None:
            return f"{'>' if low_open else '>='} {_num(low)}"
        if high is not None:
            return f"{'<' if high_open else '<='} {_num(high)}"
        return "any"


@dataclass(frozen=True)
class Rule:
    """The per-key rules :func:`option` stores in a field's metadata (under :data:`RULE_KEY`)."""

    bounds: Bounds = Bounds()
    length: int | None = None  # list keys: required number of elements (bounds apply to each element)
    non_empty: bool = False  # str keys: must not be blank
    example: Any = None  # a value for messages where the default (None) would not show the expected form
    resume: str = RESUME_ALLOW  # "refuse": a structural key that cannot change when a run resumes
    must: str | None = None  # overrides the generated description in messages ("two positive numbers")
    check: Callable[[str, Any], Any] | None = None  # a custom check replacing the generic type check
    type_text: str | None = None  # the expected type in messages, for keys with a custom check
    help: str = ""  # one line for the configuration reference (docs/configuration.md)


RULE_KEY = "dyrep_ray.rule"


def option(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
    non_empty: bool = False,
    example: Any = None,
    resume: str = RESUME_ALLOW,
    must: str | None = None,
    check: Callable[[str, Any], Any] | None = None,
    type_text: str | None = None,
    help: str = "",
) -> Any:
    """A dataclass field whose validation rules are declared with it (read back by :func:`field_rule`)."""
    if resume not in _RESUME_POLICIES:
        raise ValueError(f"resume must be one of {_RESUME_POLICIES}, got {resume!r}")
    rule = Rule(Bounds(ge, gt, le, lt), length, non_empty, example, resume, must, check, type_text, help)
    return dataclasses.field(default=default, metadata={RULE_KEY: rule})


def field_rule(f: dataclasses.Field) -> Rule:
    return f.metadata.get(RULE_KEY, Rule())


def short_repr(value: Any) -> str:
    """A bounded repr for messages (bounded work too: see _REPR_LEVELS)."""
    shortener = reprlib.Repr()
    shortener.maxlevel = _REPR_LEVELS
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = _REPR_ITEMS
    shortener.maxstring = shortener.maxother = shortener.maxlong = _MAX_REPR
    text = shortener.repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def yaml_value(value: Any) -> str:
    """A value as it would be written after ``--set key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)


def plain_value(value: Any) -> Any:
    """A validated value as a plain JSON/YAML value (enums -> their string, lists copied)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    return copy.deepcopy(value)


def split_optional(hint: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(hint, False)``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


def is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def describe_type(hint: Any, rule: Rule = Rule()) -> str:
    """The type of a key in words: ``an int``, ``a list of float or null`` ..."""
    inner, optional = split_optional(hint)
    if rule.type_text:
        text = rule.type_text
    elif get_origin(inner) is list:
        text = f"a list of {get_args(inner)[0].__name__}"
    elif is_enum(inner):
        text = "a str"
    else:
        text = f"a {inner.__name__}" if inner is not int else "an int"
    return f"{text} or null" if optional else text


# YAML 1.1 (PyYAML) reads exponent floats without a dot ("1e-4") or without an exponent sign ("1.0e4") as str.
_EXP_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$")


def coerce_scalar(value: Any, target: type) -> Any:
    """``value`` converted to ``target`` or raises ``TypeError`` (not ConfigError: the caller names the key)."""
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif target is float:
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            value = float(value.strip().replace("_", ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("must be finite")
            return float(value)
    elif target is str or is_enum(target):
        if isinstance(value, str):
            return value
    elif target is Any:
        return value
    raise TypeError


class FieldProblem(Exception):
    """One value breaking one rule; each user formats it its own way (config keys, sweep file keys)."""

    def __init__(self, kind: str, value: Any, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind  # "null" | "finite" | "type" | "choice" | "empty" | "length" | "elements" | "range"
        self.value = value
        self.detail = detail  # choice: the closest choice; range/elements: the rule text


def check_field(hint: Any, rule: Rule, value: Any) -> Any:
    """The normalized ``value`` of a field declared with ``hint`` and ``rule``; raises :class:`FieldProblem`.

    Enum values are matched case-insensitively and returned as the enum member.
    """
    inner, optional = split_optional(hint)
    if inner is Any:
        return value
    if value is None:
        if optional:
            return None
        raise FieldProblem("null", value)
    try:
        if get_origin(inner) is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = [coerce_scalar(v, get_args(inner)[0]) for v in value]
        else:
            value = coerce_scalar(value, inner)
    except ValueError:  # a non-finite float
        raise FieldProblem("finite", value) from None
    except TypeError:
        raise FieldProblem("type", value) from None
    if is_enum(inner):
        normalized = value.strip().lower()
        try:
            return inner(normalized)
        except ValueError:
            valid = [m.value for m in inner]
            close = difflib.get_close_matches(normalized, valid, n=1, cutoff=0.5)
            raise FieldProblem("choice", value, close[0] if close else "") from None
    if rule.non_empty and isinstance(value, str) and not value.strip():
        raise FieldProblem("empty", value)
    if isinstance(value, list):
        if rule.length is not None and len(value) != rule.length:
            raise FieldProblem("length", value)
        if rule.bounds and not all(rule.bounds.holds(v) for v in value):
            raise FieldProblem("elements", value, rule.bounds.text())
        return check_int_magnitude(value)
    if rule.bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not rule.bounds.holds(value):
            raise FieldProblem("range", value, rule.bounds.text())
    return check_int_magnitude(value)


def check_int_magnitude(value: Any) -> Any:
    """``value`` unless it is (or holds) an int beyond :data:`MAX_INT` (it would overflow the C ints it reaches)."""
    if type(value) is int and not -MAX_INT <= value <= MAX_INT:
        raise FieldProblem("range", value, f"<= {MAX_INT}" if value > 0 else f">= {-MAX_INT}")
    if isinstance(value, list) and any(type(v) is int and not -MAX_INT <= v <= MAX_INT for v in value):
        raise FieldProblem("elements", value, f"in [{-MAX_INT}, {MAX_INT}]")
    return value


def field_message(name: str, hint: Any, rule: Rule, default: Any, problem: FieldProblem) -> str:
    """The one-line message of config key ``name`` (declared ``hint``/``rule``/``default``) breaking a rule."""
    value, kind = problem.value, problem.kind
    shown = rule.example if rule.example is not None else default
    example = f"{name}={yaml_value(plain_value(shown))}"
    if kind == "null":
        return (f"config key {name!r} expects {describe_type(hint, rule)}, got null; set it, e.g. {example} "
                "(the default)")
    if kind == "finite":
        return f"config key {name!r} expects finite numbers, got {short_repr(value)}; e.g. {example}"
    if kind == "type":
        return (f"config key {name!r} expects {describe_type(hint, rule)}, got {short_repr(value)} "
                f"({type(value).__name__}); e.g. {example}")
    if kind == "choice":
        choices = ", ".join(m.value for m in split_optional(hint)[0])
        hint_text = f" (did you mean {problem.detail!r}?)" if problem.detail else ""
        return f"config key {name!r} must be one of {choices}; got {short_repr(value)}{hint_text}; e.g. {example}"
    if kind == "empty":
        null_ok = " or null" if split_optional(hint)[1] else ""
        return f"config key {name!r} must be a non-empty string{null_ok}, got {value!r}"
    if kind == "length":
        return (f"config key {name!r} needs exactly {rule.length} numbers, got {len(value)}: {short_repr(value)}; "
                f"e.g. {example} or null")
    if kind == "elements":
        return f"config key {name!r}: every value must be {problem.detail}, got {short_repr(value)}"
    return f"config key {name!r} must be {problem.detail}, got {short_repr(value)}; e.g. {example}"


def unknown_key_message(
    key: Any,
    valid: Sequence[str],
    kind: str = "config key",
    listing: str = "valid keys are the TrainConfig fields (see experiments/default.yaml)",
) -> str:
    """``unknown config key 'lrr' (did you mean 'lr'?)``; non-string keys (YAML ``yes:``) are named as such."""
    if not isinstance(key, str):
        extra = " (an unquoted YAML boolean: quote the key)" if isinstance(key, bool) else ""
        return f"{kind} {key!r} is not a string{extra}; keys are names such as 'lr'"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if not close and "-" in key and key.replace("-", "_") in valid:
        close = [key.replace("-", "_")]
    if close:
        return f"unknown {kind} {key!r} (did you mean {close[0]!r}?)"
    return f"unknown {kind} {key!r}; {listing}"
