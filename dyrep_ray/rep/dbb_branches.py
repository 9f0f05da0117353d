"""The branch modules of the bn block (:class:`~dyrep_ray.rep.dbb.DiverseBranchBlock`) and their builders.

Every branch has a ``bn`` attribute (its last BatchNorm: the branch's gate) and an ``equivalent_kernel``.
Kept apart from the block class so the block's fused forward (:mod:`.dbb_fused`) can check branch types
without importing the block module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch.nn.functional as F
from torch import Tensor, nn

from . import transforms as T
from .block_base import RepBlock
from .geometry import KXK, avg_branch_without_conv, mid_channels_1x1_kxk


class Branch(Protocol):
    """What every branch module offers (for the type checker: ``ModuleDict`` values are plain modules)."""

    bn: nn.BatchNorm2d

    def __call__(self, x: Tensor) -> Tensor: ...

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]: ...

# The block's BatchNorms always track running stats: their running_mean/var (Optional in torch's stubs) are
# cast to Tensor below.


class BNAndPad(nn.Module):
    """BatchNorm whose output is padded with the BN's own eval-mode bias, not zeros.

    A 1x1 conv+BN fused into a kernel with bias ``b`` yields ``b`` on zero-padded
    borders; padding with ``b`` here keeps the two-conv branch exactly foldable.
    """

    def __init__(self, num_features: int, pad: int, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, device=device, dtype=dtype)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        _, shift = T.bn_scale_shift(
            cast(Tensor, self.bn.running_mean), cast(Tensor, self.bn.running_var), self.bn.weight.detach(),
            self.bn.bias.detach(), self.bn.eps
        )
        shift = shift.reshape(1, -1, 1, 1).to(out.dtype)
        return F.pad(out - shift, [self.pad] * 4) + shift


class ConvBN(nn.Module):
    """``bn(conv(x))``; ``conv`` is an ``nn.Conv2d`` or (kxk branch only) a nested block."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        kernel, bias = conv_kernel_and_bias(self.conv)
        bn = self.bn
        kernel, bias = T.fuse_conv_bn(kernel, bias, cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var),
                                      bn.weight, bn.bias, bn.eps)
        return T.pad_kernel_to(kernel, kernel_size), bias


class OneByOneKxk(nn.Module):
    """conv1x1 -> BN(pad with bias) -> conv kxk (no padding) -> BN."""

    def __init__(self, in_ch, mid_ch, out_ch, k, stride, pad, groups, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn1 = BNAndPad(mid_ch, pad, device=device, dtype=dtype)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, k, stride=stride, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_ch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv2(self.bn1(self.conv1(x))))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        b1n, b2n = self.bn1.bn, self.bn
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, cast(Tensor, b1n.running_mean),
                                cast(Tensor, b1n.running_var), b1n.weight, b1n.bias, b1n.eps)
        kernel2, bias2 = conv_kernel_and_bias(self.conv2)  # conv2 may itself have grown into a block
        k2, b2 = T.fuse_conv_bn(kernel2, bias2, cast(Tensor, b2n.running_mean), cast(Tensor, b2n.running_var),
                                b2n.weight, b2n.bias, b2n.eps)
        return T.merge_1x1_kxk(k1, b1, k2, b2, self.groups)


class OneByOneAvg(nn.Module):
    """conv1x1 -> BN(pad with bias) -> avg-pool kxk (no padding) -> BN."""

    def __init__(self, in_ch, out_ch, k, stride, pad, groups, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn1 = BNAndPad(out_ch, pad, device=device, dtype=dtype)
        self.avg = nn.AvgPool2d(k, stride=stride, padding=0)
        self.bn = nn.BatchNorm2d(out_ch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.avg(self.bn1(self.conv1(x))))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        b1n, b2n = self.bn1.bn, self.bn
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, cast(Tensor, b1n.running_mean),
                                cast(Tensor, b1n.running_var), b1n.weight, b1n.bias, b1n.eps)
        scale2, shift2 = T.bn_scale_shift(cast(Tensor, b2n.running_mean), cast(Tensor, b2n.running_var),
                                          b2n.weight, b2n.bias, b2n.eps)
        return T.merge_1x1_avg(k1, b1, kernel_size, scale2, shift2)


class AvgBN(nn.Module):
    """Zero-padded avg-pool kxk (count_include_pad) -> BN: the depthwise 1x1_avg branch (no conv)."""

    def __init__(self, channels: int, k: int, stride: int, pad: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.avg = nn.AvgPool2d(k, stride=stride, padding=pad, count_include_pad=True)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        pad = cast(int, self.avg.padding)  # built with int k, stride and padding
        if 2 * pad <= cast(int, self.avg.kernel_size):
            return self.bn(self.avg(x))
        # avg_pool2d refuses padding > k / 2: pad explicitly (same zero-padded sum, divisor k*k)
        return self.bn(F.avg_pool2d(F.pad(x, [pad] * 4), self.avg.kernel_size, self.avg.stride, 0))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        bn = self.bn
        running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
        avg = T.avg_pool_kernel(bn.num_features, kernel_size, self.groups, like=running_mean)
        return T.fuse_conv_bn(avg, None, running_mean, running_var, bn.weight, bn.bias, bn.eps)


class IdentityBN(nn.Module):
    """BN on the input itself (the residual-like branch)."""

    def __init__(self, channels: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        bn = self.bn
        running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
        ident = T.identity_kernel(bn.num_features, kernel_size, self.groups, like=running_mean)
        return T.fuse_conv_bn(ident, None, running_mean, running_var, bn.weight, bn.bias, bn.eps)


def conv_kernel_and_bias(conv: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Kernel and bias of a plain conv, or the equivalent kernel of a nested block."""
    if isinstance(conv, RepBlock):
        return conv.equivalent_kernel()
    return cast(Tensor, conv.weight), cast("Tensor | None", conv.bias)  # a plain nn.Conv2d


@dataclass(frozen=True)
class BlockGeometry:
    """What every branch constructor needs: the block's conv hyper-parameters and factory kwargs."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    factory: dict  # {"device": ..., "dtype": ...} for new modules

    def conv(self, kernel: tuple[int, int], padding: tuple[int, int]) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, kernel, self.stride, padding, groups=self.groups,
                         bias=False, **self.factory)

    def bn(self) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(self.out_channels, **self.factory)


def _build_kxk(g: BlockGeometry, kxk_conv: nn.Module | None) -> nn.Module:
    k, p = g.kernel_size, g.padding
    return ConvBN(kxk_conv if kxk_conv is not None else g.conv((k, k), (p, p)), g.bn())


def _build_1x1_kxk(g: BlockGeometry, _: nn.Module | None) -> nn.Module:
    mid = mid_channels_1x1_kxk(g.in_channels, g.out_channels, g.groups)
    return OneByOneKxk(g.in_channels, mid, g.out_channels, g.kernel_size, g.stride, g.padding, g.groups,
                       **g.factory)


def _build_1x1_avg(g: BlockGeometry, _: nn.Module | None) -> nn.Module:
    if avg_branch_without_conv(g.in_channels, g.out_channels, g.groups):
        return AvgBN(g.out_channels, g.kernel_size, g.stride, g.padding, g.groups, **g.factory)
    return OneByOneAvg(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.groups, **g.factory)


# Branch name -> constructor(geometry, kxk_conv) (the kxk conv is only used by the kxk branch).
# Which names a geometry allows is :func:`allowed_branches`; the geometry rule of each conv
# (kernel shape, padding) is in its entry.
BRANCH_BUILDERS: dict[str, Callable[[BlockGeometry, nn.Module | None], nn.Module]] = {
    "1x1": lambda g, _: ConvBN(g.conv((1, 1), (0, 0)), g.bn()),
    "1x1_kxk": _build_1x1_kxk,
    "1x1_avg": _build_1x1_avg,
    KXK: _build_kxk,
    "1xk": lambda g, _: ConvBN(g.conv((1, g.kernel_size), (0, g.padding)), g.bn()),
    "kx1": lambda g, _: ConvBN(g.conv((g.kernel_size, 1), (g.padding, 0)), g.bn()),
    "identity": lambda g, _: IdentityBN(g.in_channels, g.groups, **g.factory),
}

