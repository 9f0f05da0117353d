"""The static DBB baseline as the original's ``--dbb`` builds it (``lib/models/utils/dbb_converter.py``,
``convert_to_dbb``), and the rule of dyrep-ray's first version (:func:`~dyrep_ray.rep.grow_cut.convert_to_dbb`).

The original walks ``named_children()`` depth first.  In each parent, a ``Conv2d`` with a 3x3 kernel becomes a new
Diverse Branch Block with the branches 1x1, 1x1_kxk, 1x1_avg and kxk (1x1_kxk, 1x1_avg and kxk where its
padding is not k // 2), built from scratch (framework default init; the conv's weights are dropped), and the
next BatchNorm2d among the same parent's later children becomes an identity (the block ends in BatchNorms of
its own).  New blocks are not walked into.  Other kernel sizes (the 7x7 ResNet stem, 1x1 convs) stay convs.
"""

from __future__ import annotations

import logging
import zlib

import torch
from torch import nn

from .blocks import BN_BLOCK, block_class
from .geometry import KXK, conv_geometry
from .replaced_bn import ReplacedBatchNorm, replaceable_bn

logger = logging.getLogger(__name__)

#: The original's ``dbb_branches=[1, 1, 1, 1, 0, 0, 0]`` (1x1, 1x1_kxk, 1x1_avg, kxk).
ORIGINAL_DBB_BRANCHES = ("1x1", "1x1_kxk", "1x1_avg", KXK)
#: Its ``[0, 1, 1, 1, 0, 0, 0]`` for a conv whose padding is not k // 2.
ORIGINAL_DBB_BRANCHES_UNCENTRED = ("1x1_kxk", "1x1_avg", KXK)
#: The only kernel size the original converts.
ORIGINAL_DBB_KERNEL = 3


def original_branches(kernel_size: int, padding: int) -> tuple[str, ...]:
    """The branch set the original's converter gives a conv of this kernel size and padding."""
    return ORIGINAL_DBB_BRANCHES if padding == kernel_size // 2 else ORIGINAL_DBB_BRANCHES_UNCENTRED


def _is_target(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (ORIGINAL_DBB_KERNEL, ORIGINAL_DBB_KERNEL)
            and conv_geometry(module) is not None)


@torch.no_grad()
def _fresh_block(conv: nn.Conv2d, path: str, seed: int, block_type: str) -> nn.Module:
    k, stride, padding = conv_geometry(conv) or (0, 0, 0)  # _is_target checked the geometry
    w = conv.weight
    kwargs = {"orig_bias": conv.bias is not None, "device": w.device, "dtype": w.dtype}
    if block_type != BN_BLOCK:  # an online block carries the conv's bias itself (no BN after it)
        kwargs["bias"] = conv.bias is not None
    block = block_class(block_type)(conv.in_channels, conv.out_channels, k, stride, padding, conv.groups,
                                    branches=original_branches(k, padding), **kwargs)
    block.train(conv.training)
    block.init_dbb_branches(torch.Generator().manual_seed(zlib.crc32(f"{seed}:dbb:{path}".encode())),
                            fresh_kxk=True)
    return block


def convert_to_dbb_original(model: nn.Module, seed: int = 0, block_type: str = BN_BLOCK) -> list[str]:
    """The original's ``convert_to_dbb`` on ``model``, in place; returns the converted conv paths in walk order.

    Every block is new and seeded per path (``seed``), so every rank builds the same model.  With
    ``block_type="online"`` the following BatchNorm is kept: an online block has no BatchNorm of its own.
    A BatchNorm subclass that does more than normalize (an activation inside) is kept too; the original's
    models have none.
    """
    converted: list[str] = []
    _convert_children(model, "", seed, block_type, converted)
    logger.info("static DBB (original rule): %d convs -> blocks", len(converted))
    return converted


def _convert_children(parent: nn.Module, prefix: str, seed: int, block_type: str, converted: list[str]) -> None:
    next_bn = False
    for name, child in list(parent.named_children()):
        path = prefix + name
        if isinstance(child, nn.Conv2d) and _is_target(child):
            setattr(parent, name, _fresh_block(child, path, seed, block_type))
            converted.append(path)
            next_bn = block_type == BN_BLOCK
            continue
        if next_bn and isinstance(child, nn.BatchNorm2d):
            next_bn = False
            if replaceable_bn(child):
                setattr(parent, name, ReplacedBatchNorm.replacing(child))
                continue
        _convert_children(child, path + ".", seed, block_type, converted)
