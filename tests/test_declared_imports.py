"""Every third-party module the repository imports comes from a distribution that pyproject.toml names itself.

Derived from the code and the installed package metadata, with no hand-kept list of module names: a module found
only because some other package happens to pull it in (or because it was installed by hand) fails here, since a
fresh ``pip install -e ".[test]"`` would not be guaranteed to bring it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
PROJECT = PYPROJECT["name"]
#: Extras only the developer's tools use (the suite, lint, type-check); every other extra is a runtime feature.
DEV_EXTRAS = {"test"}
#: Where each tree's imports may come from: the runtime code and what a user runs from the repository may use
#: the base requirements and the runtime extras (optional features import theirs lazily); the suite and the
#: benchmarks may use every extra.
RUNTIME_TREES = ("dyrep_ray", "examples", "experiments", "cluster")
DEV_TREES = ("tests", "bench")
FIRST_PARTY = {"dyrep_ray", "tests", "bench"}
#: Calls that import a module named by a string literal.
IMPORTING_CALLS = {"importorskip", "import_module"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?", requirement)
    assert match, f"unreadable requirement in pyproject.toml: {requirement!r}"
    return norm(match.group(1))


def requirement_extras(requirement: str) -> set[str]:
    match = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\[([^\]]*)\]", requirement)
    return {norm(x) for x in match.group(1).split(",")} if match else set()


def declared(extras: set[str]) -> set[str]:
    """Distributions named directly by the base requirements and ``extras`` (self-references followed)."""
    optional = {norm(k): v for k, v in PYPROJECT.get("optional-dependencies", {}).items()}
    names = {requirement_name(r) for r in PYPROJECT["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if requirement_name(requirement) == norm(PROJECT):
                todo.extend(requirement_extras(requirement))
            else:
                names.add(requirement_name(requirement))
    return names


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORTING_CALLS):
            modules.add(node.args[0].value.split(".")[0])
    return modules - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def undeclared(trees: tuple[str, ...], allowed: set[str]) -> dict[str, list[str]]:
    provides = md.packages_distributions()
    problems: dict[str, list[str]] = {}
    for tree in trees:
        for path in sorted((ROOT / tree).rglob("*.py")):
            local = {p.stem for p in path.parent.glob("*.py")}  # a script's sibling module
            for module in sorted(imported_modules(path) - local):
                dists = {norm(d) for d in provides.get(module, [])}
                if not dists & allowed:
                    origin = ", ".join(sorted(dists)) or "not installed"
                    problems.setdefault(f"{module} ({origin})", []).append(str(path.relative_to(ROOT)))
    return problems


def runtime_extras() -> set[str]:
    return {norm(e) for e in PYPROJECT.get("optional-dependencies", {})} - DEV_EXTRAS


def test_runtime_code_imports_only_base_and_runtime_extras():
    problems = undeclared(RUNTIME_TREES, declared(runtime_extras()))
    assert not problems, f"imported but not declared in [project] dependencies or a runtime extra: {problems}"


def test_suite_and_benchmarks_import_only_declared_distributions():
    problems = undeclared(DEV_TREES, declared(runtime_extras() | DEV_EXTRAS))
    assert not problems, f"imported but not declared in pyproject.toml (add it to the 'test' extra): {problems}"


def test_tools_that_ci_runs_are_declared_in_the_test_extra():
    modules = set(re.findall(r"-m\s+([A-Za-z_][\w]*)", (ROOT / ".ci" / "run").read_text(encoding="utf-8")))
    modules -= set(sys.stdlib_module_names) | {"pip"}  # pip comes with every venv
    assert {"pytest", "ruff", "mypy"} <= modules, modules  # what .ci/run is known to call: the regex still reads it
    provides = md.packages_distributions()
    missing = {m for m in modules if not {norm(d) for d in provides.get(m, [])} & declared(DEV_EXTRAS)}
    assert not missing, f".ci/run runs modules the 'test' extra does not declare: {sorted(missing)}"


@pytest.mark.parametrize("source, expected", [
    ("import a.b\nfrom c.d import e\nfrom . import f\nimport os", {"a", "c"}),
    ("pytest.importorskip('g.h')\nimportlib.import_module('i')\nimport_module('.rel', 'x')", {"g", "i", "pytest"}),
])
def test_import_reader_sees_every_form(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text("import pytest\n" + source if "importorskip" in source else source)
    assert imported_modules(path) == expected


def test_a_module_that_only_another_package_brings_is_reported(tmp_path, monkeypatch):
    # yaml is installed (a base requirement); with an empty allowed set it must be reported, not silently passed
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import yaml\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert list(undeclared(("pkg",), set())) == ["yaml (pyyaml)"]
