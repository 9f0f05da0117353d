"""The modules of dyrep_ray import each other without circles, and none is longer than one job needs.

Every ``import`` / ``from ... import`` statement counts, wherever it stands (module level, inside a function,
under ``if TYPE_CHECKING:``), relative or absolute: a function-level import that closes a circle still ties the
two modules together, it only hides the circle from the interpreter until the call.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "dyrep_ray"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE



def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (symlinked folders are not ours: skipped)."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not os.path.islink(os.path.join(dirpath, d)))
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath, filename)
                parts = [package, *path.relative_to(root).with_suffix("").parts]
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, is_package: bool, tree: ast.AST, known: Mapping[str, Path]) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source


def import_graph(modules: Mapping[str, Path], package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name resolves to its longest known prefix)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imported in _imported_names(name, path.name == "__init__.py", tree, modules):
            if imported != package and not imported.startswith(package + "."):
                continue
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported:
                graph[name].add(imported)
    return graph


def circles(graph: Mapping[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module, and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(start: str) -> None:  # iterative Tarjan: no recursion limit to meet
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        found.append(frozenset(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def _text(components: Iterable[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(components, key=sorted)) or "none"


def test_the_package_has_no_import_circle():
    modules = package_modules(PACKAGE_DIR, PACKAGE)
    assert {"dyrep_ray", "dyrep_ray.cli", "dyrep_ray.rundir.lock", "dyrep_ray.export.convert"} <= set(modules)
    found = circles(import_graph(modules, PACKAGE))
    assert not found, f"import circles: {_text(found)}; move the shared piece into a module both can import"


@pytest.mark.parametrize("how", ["module level", "in a function", "relative", "self"])
def test_circle_finder_sees_every_kind_of_import(tmp_path, how):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "sub" / "__init__.py"):
        init.write_text("")
    (pkg / "c.py").write_text("import os\nfrom pkg.sub import b\n")  # imports b, nobody imports c: no circle
    back = {"module level": "import pkg.sub.a\n", "in a function": "def f():\n    from pkg.sub import a\n",
            "relative": "from . import a\n", "self": ""}[how]
    (pkg / "sub" / "a.py").write_text("from .b import thing\n" if how != "self" else "from pkg.sub import a\n")
    (pkg / "sub" / "b.py").write_text(back + "thing = 1\n")
    graph = import_graph(package_modules(pkg, "pkg"), "pkg")
    expected = {"self": frozenset({"pkg.sub.a"})}.get(how, frozenset({"pkg.sub.a", "pkg.sub.b"}))
    assert circles(graph) == [expected]
    assert graph["pkg.c"] == {"pkg.sub.b"}  # os is not ours; ``from pkg.sub import b`` names the submodule


#: One job per module: past this many lines a module is doing several (split it by job, as engine/config*.py).
MAX_MODULE_LINES = 500


def test_no_module_is_longer_than_the_limit():
    modules = package_modules(PACKAGE_DIR, PACKAGE)
    lines = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert len(modules) > 50
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}; split them by job"
