"""Module paths of a model and its blocks: lookup, replacement, enclosing blocks, growable convs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .block_base import RepBlock
from .blocks import block_class, is_block
from .geometry import conv_geometry


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def iter_blocks(model: nn.Module) -> list[tuple[str, RepBlock]]:
    """Every block of any type (nested ones included), outermost first."""
    return [(n, m) for n, m in model.named_modules() if is_block(m)]


def enclosing_blocks(model: nn.Module, path: str) -> list[RepBlock]:
    """The blocks enclosing the module at ``path`` (the module itself excluded), outermost first."""
    parts = path.split(".") if path else []
    found = []
    for i in range(len(parts)):
        module = get_submodule(model, ".".join(parts[:i]))
        if is_block(module):
            found.append(module)
    return found


def block_depth(model: nn.Module, path: str) -> int:
    """Number of blocks enclosing the module at ``path`` (the module itself excluded)."""
    return len(enclosing_blocks(model, path))


def eligible_convs(model: nn.Module, max_depth: int = 2, exclude: Sequence[str] = (),
                   block_type: str | None = None) -> list[tuple[str, nn.Conv2d]]:
    """Plain convs DyRep may grow: square k>1 convs whose module path passes through fewer than
    ``max_depth`` blocks (the original's rule).  Inside a block (either type) that is the kxk
    branch's conv and the 1x1->kxk branch's kxk conv (``branches.1x1_kxk.conv2``, padding 0, so
    it grows the reduced branch set).  With ``block_type`` given, a conv inside a block of the
    other type is not eligible: blocks nest only in blocks of their own type (an online block's
    kernel assembly needs a nested block that is linear in train mode, a bn block is not)."""
    wanted = None if block_type is None else block_class(block_type)
    found = []
    for name, module in model.named_modules():
        if conv_geometry(module) is None or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        outer = enclosing_blocks(model, name)
        if len(outer) < max_depth and (wanted is None or all(type(b) is wanted for b in outer)):
            found.append((name, module))
    return found


def type_class(block_type: str) -> type[RepBlock]:
    """The block class of a block type name ("bn" / "online")."""
    return block_class(block_type)
