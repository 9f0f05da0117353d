"""The configuration reference (docs/configuration.md), generated from the schema.

Every row comes from a key's declaration in :mod:`~dyrep_ray.engine.config_schema` (type hint, default, rules,
``help``), the cross-field rules from their docstrings, so the reference cannot drift from what is checked.
Regenerate after changing a key::

    python -m dyrep_ray.engine.config_reference > docs/configuration.md

(tests/test_config_reference.py fails while the file differs from this output).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin

from . import config_values
from .config_checks import CROSS_FIELD_RULES
from .config_rules import RESUME_REFUSE, Rule, describe_type, is_enum, plain_value, split_optional, yaml_value
from .config_schema import REMOVED_KEYS, default_of, field_names, hint_of, rule_of

__all__ = ["COMMAND", "main", "render"]

#: The command that writes the reference; stale-file messages name it.
COMMAND = "python -m dyrep_ray.engine.config_reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from dyrep_ray/engine/config_schema.py: do not edit; run `{COMMAND}`. -->

A dyrep-ray run is configured by one flat mapping of the keys below. The values a run uses are, in increasing
precedence: these defaults (the built-in demo experiment, spelled out in `experiments/default.yaml`), a sweep's
base config, the YAML file given with `-c`, then each `--set key=value`. Every value is checked before anything
runs; a problem is reported in one line naming the key and the fix.

A YAML file may start with `format: dyrep-ray` or `format: dyrep-original`; without that marker, a file holding
any key that exists only in original DyRep strategy files (e.g. `sgd_no_nesterov`, or a hyphenated key) is
translated from that format.

Columns: *type* (`null` allowed where it says so; float keys accept ints and `1e-4`), *default*, *allowed*
(range, choices or length), *resume* (`fixed`: a resumed run refuses a change of the key; `may change`: the new
value takes effect from the resumed epoch).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(hint: Any, rule: Rule) -> str:
    text = describe_type(hint, rule)
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):]
    return text


def _allowed(hint: Any, rule: Rule) -> str:
    inner = split_optional(hint)[0]
    if rule.must:
        return rule.must
    if is_enum(inner):
        return ", ".join(f"`{m.value}`" for m in inner)
    if inner is bool:
        return "`true`, `false`"
    if get_origin(inner) is list:
        count = f"{rule.length} numbers" if rule.length is not None else f"{get_args(inner)[0].__name__} values"
        return f"{count}, each {rule.bounds.text()}" if rule.bounds else count
    if rule.bounds:
        return rule.bounds.text()
    if rule.non_empty:
        return "non-empty"
    return "any"


def _row(name: str) -> str:
    hint, rule = hint_of(name), rule_of(name)
    cells = (
        f"`{name}`",
        _type(hint, rule),
        f"`{yaml_value(plain_value(default_of(name)))}`",
        _allowed(hint, rule),
        "fixed" if rule.resume == RESUME_REFUSE else "may change",
        rule.help,
    )
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _named(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"`{k}`: {_named(v)}" for k, v in value.items())
    if isinstance(value, tuple):
        return ", ".join(f"`{plain_value(v)}`" for v in value)
    gib = value / 2**30
    return f"{value:,}" + (f" ({gib:g} GiB)" if gib >= 1 and gib == int(gib) else "")


def render() -> str:
    """The whole reference as Markdown (ends with a newline)."""
    lines = [_INTRO, "## Keys", "", "| key | type | default | allowed | resume | description |",
             "|---|---|---|---|---|---|"]
    lines += [_row(name) for name in field_names()]
    lines += ["", "## Rules across keys", "", "Checked after every key passed its own rules:", ""]
    lines += [f"- {' '.join((rule.__doc__ or rule.__name__).split())}" for rule in CROSS_FIELD_RULES]
    lines += ["", "Values named above (declared in dyrep_ray/engine/config_values.py):", ""]
    lines += [f"- `{name}`: {_named(getattr(config_values, name))}" for name in config_values.__all__ if name.isupper()]
    lines += ["", "## Removed keys", "", "A config that still sets one of these is refused; delete the key.", ""]
    lines += [f"- `{name}`: {why}" for name, why in REMOVED_KEYS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        sys.stderr.write(f"usage: {COMMAND}\n")
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
