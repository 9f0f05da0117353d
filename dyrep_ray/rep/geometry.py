"""Branch names and geometry rules shared by every block type (no block class here, so both block modules
and the bn block's fused forward import it without importing each other)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

BRANCH_NAMES = ("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1", "identity")
# Branches that need the kxk window centred on the output pixel (padding == k // 2).
CENTRED_BRANCHES = ("1x1", "1xk", "kx1", "identity")
KXK = "kxk"
# How a cut keeps the block's function: "reset" (the original DyRep) or "absorb" (dyrep-ray's first version).
CUT_MODES = ("reset", "absorb")
# In which order an adjust judges and applies cuts: "original" (the original DyRep: blocks in named_modules()
# order, outermost first, each judged after the cuts before it) or "inner_first" (dyrep-ray's first version: all
# judged on the model before any cut, applied innermost first).
CUT_ORDERS = ("original", "inner_first")
# What a grow does to the optimizer state of the grown conv: "restart" (the original: its block's parameters are
# new, with fresh state) or "carry" (dyrep-ray's first version: the kxk conv keeps the conv's state).
GROW_OPTIM_STATES = ("restart", "carry")
# Last-BN gamma (bn block) or scale (online block) of a new branch (the original DyRep's value).
DEFAULT_INIT_GAMMA = 0.01
# Attribute set on convs/blocks that replace a user's conv: whether the user's
# original conv had a bias (deploy must restore that layout).
ORIG_BIAS_ATTR = "dyrep_orig_bias"


def allowed_branches(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> tuple[str, ...]:
    """The branch set a block of this geometry can hold while staying exactly foldable."""
    names = list(BRANCH_NAMES)
    if padding != kernel_size // 2:
        names = [n for n in names if n not in CENTRED_BRANCHES]
    elif in_channels != out_channels or stride != 1:
        names.remove("identity")
    return tuple(names)


def block_branch_names(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int | None,
                       branches: Sequence[str] | None, block: str) -> tuple[int, tuple[str, ...]]:
    """(padding, branch names) of a new ``block`` (class name, for the errors): the default padding is "same",
    the default branch set every allowed one; an unknown or disallowed branch, or no kxk, is a ValueError."""
    padding = kernel_size // 2 if padding is None else padding
    allowed = allowed_branches(in_channels, out_channels, kernel_size, stride, padding)
    names = allowed if branches is None else tuple(branches)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"branches {unknown} not allowed for this geometry (allowed: {list(allowed)})")
    if KXK not in names:
        raise ValueError(f"a{'n' if block[0] in 'AEIOU' else ''} {block} always holds its 'kxk' branch")
    return padding, names


def mid_channels_1x1_kxk(in_channels: int, out_channels: int, groups: int) -> int:
    """Width of the 1x1->kxk bottleneck: ``in_channels``, depthwise included (the original DyRep's
    DBB; Ding et al.'s DBB doubles it for depthwise convs)."""
    return in_channels


def avg_branch_without_conv(in_channels: int, out_channels: int, groups: int) -> bool:
    """Depthwise geometry (groups >= out_channels, in == out): the original's 1x1_avg branch is a
    zero-padded avg-pool -> BN, with no 1x1 conv in front."""
    return groups >= out_channels and in_channels == out_channels


def conv_geometry(conv: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) if ``conv`` can become a block, else None.

    Odd square kernels only: the centred branches need a centre tap.
    """
    if type(conv) is not nn.Conv2d:
        return None
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    if isinstance(conv.padding, str):
        return None
    ph, pw = conv.padding
    if (kh != kw or kh <= 1 or kh % 2 == 0 or sh != sw or ph != pw or conv.dilation != (1, 1)
            or conv.padding_mode != "zeros"):
        return None
    return kh, sh, ph
