"""A faithful re-implementation of the original DyRep bn block's train-mode forward, the baseline of
benchmark 2.

Source: hunto/image_classification_sota, ``lib/models/utils/dbb/dbb_block.py``:

* ``DiverseBranchBlock.forward`` (not deployed): ``branch_outs`` collects, in this order, ``dbb_kxk``,
  ``dbb_1x1``, ``dbb_1x1_kxk``, ``dbb_1x1_avg``, ``dbb_1xk``, ``dbb_kx1``, ``dbb_id`` (each only if its branch
  is on), then ``out = self.nonlinear(torch.stack(branch_outs).sum(0))`` with ``nonlinear = nn.Sequential()``
  (identity) as DyRep builds it;
* ``ConvBN.forward``: ``bn(conv(x))``; the kxk conv is built with ``bias=True`` (the others without);
* ``dbb_1x1_kxk`` is ``nn.Sequential(conv1, bn1=BNAndPad, conv2 (no padding), bn2)``, ``dbb_1x1_avg`` is
  ``nn.Sequential(conv, bn=BNAndPad, avg=AvgPool2d(k, stride, padding=0), avgbn)``;
* ``BNAndPad.forward``: ``bn(x)``, then the pad value ``bn.bias + bn.weight * (-running_mean /
  sqrt(running_var + eps))`` (``.data``: no gradient; running stats already updated by this call) and two
  ``torch.cat`` (rows, then columns) to pad with it.

:func:`original_from_block` builds one with the same parameters and BN state as a dyrep-ray
:class:`~dyrep_ray.rep.dbb.DiverseBranchBlock` (groups 1, plain convs), so both compute the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dyrep_ray.rep.dbb import DiverseBranchBlock


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class BNAndPad(nn.Module):
    """``BNAndPad`` of the original, ``last_conv_bias=None`` (its 1x1 convs have no bias)."""

    def __init__(self, bn: nn.BatchNorm2d, pad_pixels: int):
        super().__init__()
        self.bn, self.pad_pixels = bn, pad_pixels

    def forward(self, x: Tensor) -> Tensor:
        output = self.bn(x)
        if self.pad_pixels > 0:
            bias = -self.bn.running_mean
            pad_values = self.bn.bias.data + self.bn.weight.data * (bias / torch.sqrt(self.bn.running_var
                                                                                      + self.bn.eps))
            n, c, h, w = output.size()
            values = pad_values.view(1, -1, 1, 1)
            w_values = values.expand(n, -1, self.pad_pixels, w)
            x = torch.cat([w_values, output, w_values], dim=2)
            h = h + self.pad_pixels * 2
            h_values = values.expand(n, -1, h, self.pad_pixels)
            output = torch.cat([h_values, x, h_values], dim=3)
        return output


class OriginalDBB(nn.Module):
    """The original block's branches and forward (see module docstring); ``branches`` maps the original's
    attribute names to modules."""

    ORDER = ("dbb_kxk", "dbb_1x1", "dbb_1x1_kxk", "dbb_1x1_avg", "dbb_1xk", "dbb_kx1", "dbb_id")

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__()
        self.nonlinear = nn.Sequential()
        for name in self.ORDER:
            if name in branches:
                self.add_module(name, branches[name])

    def forward(self, inputs: Tensor) -> Tensor:
        branch_outs = [getattr(self, name)(inputs) for name in self.ORDER if hasattr(self, name)]
        return self.nonlinear(torch.stack(branch_outs).sum(0))


def _copy_conv(conv: nn.Conv2d, bias: bool = False) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=bias, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if bias:
            new.bias.zero_()  # the original's kxk conv always has a bias; zero keeps the same function
    return new


def _copy_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype)
    new.load_state_dict(bn.state_dict())
    return new


def original_from_block(block: DiverseBranchBlock) -> OriginalDBB:
    """The original block with ``block``'s parameters and BN state (plain convs, groups 1)."""
    br = block.branches
    mods: dict[str, nn.Module] = {}
    mods["dbb_kxk"] = ConvBN(_copy_conv(br["kxk"].conv, bias=True), _copy_bn(br["kxk"].bn))
    for ours, theirs in (("1x1", "dbb_1x1"), ("1xk", "dbb_1xk"), ("kx1", "dbb_kx1")):
        if ours in br:
            mods[theirs] = ConvBN(_copy_conv(br[ours].conv), _copy_bn(br[ours].bn))
    if "1x1_kxk" in br:
        b = br["1x1_kxk"]
        mods["dbb_1x1_kxk"] = nn.Sequential()
        mods["dbb_1x1_kxk"].add_module("conv1", _copy_conv(b.conv1))
        mods["dbb_1x1_kxk"].add_module("bn1", BNAndPad(_copy_bn(b.bn1.bn), b.bn1.pad))
        mods["dbb_1x1_kxk"].add_module("conv2", _copy_conv(b.conv2))
        mods["dbb_1x1_kxk"].add_module("bn2", _copy_bn(b.bn))
    if "1x1_avg" in br:
        b = br["1x1_avg"]
        mods["dbb_1x1_avg"] = nn.Sequential()
        mods["dbb_1x1_avg"].add_module("conv", _copy_conv(b.conv1))
        mods["dbb_1x1_avg"].add_module("bn", BNAndPad(_copy_bn(b.bn1.bn), b.bn1.pad))
        mods["dbb_1x1_avg"].add_module("avg", nn.AvgPool2d(block.kernel_size, block.stride, padding=0))
        mods["dbb_1x1_avg"].add_module("avgbn", _copy_bn(b.bn))
    if "identity" in br:
        mods["dbb_id"] = _copy_bn(br["identity"].bn)
    return OriginalDBB(mods)
