"""The registry of DyRep block types, by name.

* ``"bn"``: :class:`~dyrep_ray.rep.dbb.DiverseBranchBlock` (the paper's block: a BN after every branch);
* ``"online"``: :class:`~dyrep_ray.rep.online.OnlineBlock` (OREPA-style: per-channel branch scales, one conv
  with a kernel assembled every step).

Both implement :class:`~dyrep_ray.rep.block_base.RepBlock`, the only interface the controller, deploy, the
structure graph and timm use.  A new block type is a module with a ``RepBlock`` subclass (setting
``block_type`` and ``graph_entry_type``) plus one :func:`register_block_type` line below.
"""

from __future__ import annotations

from typing import TypeGuard

from torch import nn

from .block_base import RepBlock
from .dbb import DiverseBranchBlock
from .online import OnlineBlock

#: Block type name -> class.  A model's blocks are all of the type its DyRep controller grows.
BLOCK_CLASSES: dict[str, type[RepBlock]] = {}
#: Structure-graph entry type -> class (the bn block's entries, "dbb", predate the online block).
GRAPH_ENTRY_CLASSES: dict[str, type[RepBlock]] = {}


def register_block_type(cls: type[RepBlock]) -> type[RepBlock]:
    """Make ``cls`` growable by its ``block_type`` name and restorable from its graph entries."""
    for table, key in ((BLOCK_CLASSES, cls.block_type), (GRAPH_ENTRY_CLASSES, cls.graph_entry_type)):
        if key in table and table[key] is not cls:
            raise ValueError(f"block type {key!r} is already registered to {table[key].__name__}")
        table[key] = cls
    return cls


register_block_type(DiverseBranchBlock)
register_block_type(OnlineBlock)

BN_BLOCK, ONLINE_BLOCK = DiverseBranchBlock.block_type, OnlineBlock.block_type
BLOCK_TYPE_NAMES = tuple(BLOCK_CLASSES)
#: For ``isinstance``: every block class derives from this one.
BLOCK_TYPES = (RepBlock,)
#: Structure-graph entry type of each block type.
GRAPH_ENTRY_TYPES = {name: cls.graph_entry_type for name, cls in BLOCK_CLASSES.items()}


def is_block(module: nn.Module) -> TypeGuard[RepBlock]:
    """True for a DyRep block of any registered type."""
    return isinstance(module, RepBlock)


def block_type_name(module: nn.Module) -> str:
    """The registry name of a block's type (``"bn"``, ``"online"``; ValueError for anything else)."""
    if not isinstance(module, RepBlock):
        raise ValueError(f"{type(module).__name__} is not a DyRep block")
    return module.block_type


def check_block_type(block_type: str) -> str:
    """``block_type`` as a plain ``str`` (config enums included), or ValueError naming the choices."""
    if block_type not in BLOCK_TYPE_NAMES:
        raise ValueError(f"unknown block type {block_type!r}; choose one of {list(BLOCK_TYPE_NAMES)}")
    return BLOCK_TYPE_NAMES[BLOCK_TYPE_NAMES.index(block_type)]


def block_class(block_type: str) -> type[RepBlock]:
    """The class of a block type name (ValueError naming the choices)."""
    return BLOCK_CLASSES[check_block_type(block_type)]


def graph_entry_class(entry_type: str) -> type[RepBlock] | None:
    """The block class whose structure-graph entries have type ``entry_type``, or None."""
    return GRAPH_ENTRY_CLASSES.get(entry_type)
