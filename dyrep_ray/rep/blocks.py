"""The two block types DyRep grows, behind one test and one name table.

* ``"bn"``: :class:`~dyrep_ray.rep.dbb.DiverseBranchBlock` (the paper's block: a BN after every branch);
* ``"online"``: :class:`~dyrep_ray.rep.online.OnlineBlock` (OREPA-style: per-channel branch scales, one conv
  with a kernel assembled every step).

Both offer what the controller, deploy and the structure graph use: ``branch_names``, ``kxk_branch``,
``kxk_scale()`` (what a cut's absorption divides by, and the reference of ``branch_importance()``),
``branch_importance()``, ``cut(names, mode=, seed=, init_gamma=)``, ``to_conv()``, ``describe()`` and
``equivalent_kernel()``.
"""

from __future__ import annotations

from typing import TypeGuard, cast

from torch import nn

from .dbb import DiverseBranchBlock
from .online import OnlineBlock

BN_BLOCK, ONLINE_BLOCK = "bn", "online"
#: Block type name -> class.  A model's blocks are all of the type its DyRep controller grows.
BLOCK_CLASSES: dict[str, type[nn.Module]] = {BN_BLOCK: DiverseBranchBlock, ONLINE_BLOCK: OnlineBlock}
BLOCK_TYPE_NAMES = tuple(BLOCK_CLASSES)
#: For ``isinstance``: every block class.
BLOCK_TYPES = cast("tuple[type[DiverseBranchBlock], type[OnlineBlock]]", tuple(BLOCK_CLASSES.values()))
#: Structure-graph entry type of each block type (the bn block's entries predate the online block).
GRAPH_ENTRY_TYPES = {BN_BLOCK: "dbb", ONLINE_BLOCK: "online"}


def is_block(module: nn.Module) -> TypeGuard[DiverseBranchBlock | OnlineBlock]:
    """True for a DyRep block of either type."""
    return isinstance(module, BLOCK_TYPES)


def block_type_name(module: nn.Module) -> str:
    """``"bn"`` or ``"online"`` for a block (ValueError otherwise)."""
    for name, cls in BLOCK_CLASSES.items():
        if isinstance(module, cls):
            return name
    raise ValueError(f"{type(module).__name__} is not a DyRep block")


def check_block_type(block_type: str) -> str:
    """``block_type`` as a plain ``str`` (config enums included), or ValueError naming the choices."""
    if block_type not in BLOCK_TYPE_NAMES:
        raise ValueError(f"unknown block type {block_type!r}; choose one of {list(BLOCK_TYPE_NAMES)}")
    return BLOCK_TYPE_NAMES[BLOCK_TYPE_NAMES.index(block_type)]
