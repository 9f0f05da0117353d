"""The block contract holds across the code base: only a block type's own module names its class in a type test."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from dyrep_ray.rep.block_base import RepBlock
from dyrep_ray.rep.blocks import BLOCK_CLASSES

ROOT = Path(__file__).resolve().parents[1]
CODE_TREES = ("dyrep_ray", "bench", "examples")


def concrete_type_tests(source: str, class_names: set[str]) -> list[int]:
    """Lines of ``isinstance(x, C)`` / ``issubclass(x, C)`` / ``type(x) is C`` naming a class of ``class_names``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        named: list[ast.expr] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "isinstance", "issubclass") and len(node.args) == 2:
            target = node.args[1]
            named = list(target.elts) if isinstance(target, ast.Tuple) else [target]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.Eq)) for op in node.ops):
            named = node.comparators
        names = {n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None for n in named}
        if names & class_names:
            lines.append(node.lineno)
    return lines


def test_no_type_test_on_a_concrete_block_class_outside_its_module():
    assert BLOCK_CLASSES, "no block type registered"
    own = {cls.__name__: Path(inspect.getfile(cls)).resolve() for cls in BLOCK_CLASSES.values()}
    offenders = []
    for tree in CODE_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            hits = concrete_type_tests(path.read_text(), set(own))
            if hits and path.resolve() not in own.values():
                offenders += [f"{path.relative_to(ROOT)}:{line}" for line in hits]
    assert not offenders, f"type tests on a concrete block class (use is_block / RepBlock methods): {offenders}"


@pytest.mark.parametrize("snippet", ["isinstance(m, OnlineBlock)", "isinstance(m, (nn.Conv2d, rep.OnlineBlock))",
                                     "type(m) is OnlineBlock", "issubclass(c, OnlineBlock)"])
def test_the_scan_sees_every_form_of_type_test(snippet):
    assert concrete_type_tests(f"x = {snippet}\n", {"OnlineBlock"}) == [1]


@pytest.mark.parametrize("block_type", sorted(BLOCK_CLASSES))
def test_every_registered_type_implements_the_whole_contract(block_type):
    cls = BLOCK_CLASSES[block_type]
    assert issubclass(cls, RepBlock) and not inspect.isabstract(cls), sorted(getattr(cls, "__abstractmethods__", ()))
    assert cls.block_type == block_type
