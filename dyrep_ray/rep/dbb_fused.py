"""The fused train-mode forward of :class:`~dyrep_ray.rep.dbb.DiverseBranchBlock`.

Same function, same gradients and the same BN running-statistic updates as running every
branch module, with less memory traffic: see :func:`forward_fused`.  :func:`fusable` decides
per call whether the fast path is exact for a block (plain branch modules, no hooks that the
fast path would bypass); otherwise the block runs its branches one by one.
"""

from __future__ import annotations

from typing import TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from . import dbb_recompute
from .block_base import RepBlock
from .dbb_branches import BNAndPad, ConvBN, IdentityBN, OneByOneAvg, OneByOneKxk
from .dbb_pad import avg_pool_zero_padded, padding_term_avg, padding_term_conv
from .dbb_recompute import pad_value, recomputable
from .geometry import KXK


def fusable(block: RepBlock) -> bool:
    """True if :func:`forward_fused` computes exactly what the branch modules would.

    It needs ``groups == 1``, the branch modules this class builds (exact types, plain
    ``nn.Conv2d`` without bias, plain ``nn.BatchNorm2d``) and no hooks anywhere in the block:
    the fused path calls the convs of the 1x1 / 1x1_kxk / 1x1_avg branches functionally, so
    their hooks would not fire, and it adds into a tensor in place.  Anything else takes
    the block's per-branch forward.  Checked on every call (cheap: direct attribute access only).
    """
    if block.groups != 1 or _global_module_hooks():
        return False
    for name, branch in block.branches._modules.items():
        parts = _fusable_parts(name, branch, block.kernel_size, block.stride)
        if parts is None or any(_has_hooks(m) for m in parts):
            return False
    return True


def forward_fused(block: RepBlock, x: Tensor) -> Tensor:
    """The same function (and the same BN running-stat updates) as the block's per-branch forward, faster
    and keeping less for backward.

    * the branches that start with a 1x1 conv on ``x`` at stride 1 (``1x1``, ``1x1_kxk``, ``1x1_avg``) run
      their 1x1 convs as one conv on the concatenated weights; when their BNs use batch statistics and
      autograd records (training), they keep nothing but ``x`` and their parameters for backward and are
      recomputed there (:mod:`.dbb_recompute`: cheap 1x1 convs, BNs, a box filter; the 1x1_kxk
      branch's kxk conv is not re-run);
    * ``BNAndPad`` + unpadded kxk conv / avg-pool becomes a zero-padded conv / avg-pool plus a
      tiny input-independent border term (the bias padding's contribution), so no padded copy
      of the activation is made and the three elementwise passes of ``BNAndPad`` disappear;
    * branch outputs are accumulated in place into one tensor the block owns.
    Every BatchNorm keeps its own statistics, running-stat updates (momentum, ``num_batches_tracked``)
    and train/eval flag exactly as per branch.
    """
    br = block.branches
    k, s = block.kernel_size, block.stride
    # fusable() checked the branch types
    one, two, avg = cast("tuple[ConvBN | None, OneByOneKxk | None, OneByOneAvg | None]",
                         (br[n] if n in br else None for n in ("1x1", "1x1_kxk", "1x1_avg")))
    # The kxk branch's BN output is a fresh tensor nothing else holds (no hooks: see fusable),
    # so the other branches are added into it in place -- unless a branch's dtype would promote
    # the sum (autocast: BN outputs can be wider than conv outputs), then once out of place.
    out = br[KXK](x)

    def accumulate(y: Tensor) -> None:
        nonlocal out
        if torch.result_type(out, y) == out.dtype:
            out.add_(y)
        else:
            out = out + y

    reader_one = one if s == 1 else None  # the 1x1 branch reads x at the block's stride
    readers: list[nn.Module] = [b for b in (reader_one, two, avg) if b is not None]
    if readers and _recompute(readers, x):
        direct, y = dbb_recompute.one_by_one_readers(x, k, s, reader_one, two, avg)
        if direct is not None:
            accumulate(direct)
        if two is not None:
            accumulate(two.bn(cast(Tensor, y)))
    else:
        _readers_autograd(x, k, s, reader_one, two, avg, accumulate)
    if one is not None and reader_one is None:
        accumulate(one(x))
    for name in ("1xk", "kx1", "identity"):
        if name in br:
            accumulate(br[name](x))
    return out


def _recompute(readers: list[nn.Module], x: Tensor) -> bool:
    """Recompute the 1x1 readers in backward when autograd records and their BNs normalize with batch
    statistics (under autocast the ordinary graph: the recompute would have to replay autocast)."""
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return False
    bns = [cast(nn.BatchNorm2d, m) for r in readers for m in r.modules() if isinstance(m, nn.BatchNorm2d)]
    last_kxk = [cast(OneByOneKxk, r).bn for r in readers if isinstance(r, OneByOneKxk)]  # a module call after
    return recomputable([bn for bn in bns if all(bn is not b for b in last_kxk)])


def _readers_autograd(x: Tensor, k: int, s: int, one: ConvBN | None, two: OneByOneKxk | None,
                      avg: OneByOneAvg | None, accumulate) -> None:
    """The 1x1 readers through ordinary autograd (eval-mode BNs, no grad, autocast)."""
    convs = [cast(nn.Conv2d, one.conv)] if one is not None else []
    convs += [b.conv1 for b in (two, avg) if b is not None]
    if len(convs) > 1:
        weight = torch.cat([c.weight for c in convs])
        outs = F.conv2d(x, weight).split([c.out_channels for c in convs], dim=1)
    else:
        outs = [c(x) for c in convs]
    by_conv = dict(zip((id(c) for c in convs), outs))
    if one is not None:
        accumulate(one.bn(by_conv[id(one.conv)]))
    if two is not None:
        z = _bn_then_padded(two.bn1, two.bn1.bn(by_conv[id(two.conv1)]))
        conv2 = two.conv2
        y = F.conv2d(z.tensor, conv2.weight, None, conv2.stride, z.pad)
        if z.pad:  # in place: a conv does not keep its output for backward
            y.add_(padding_term_conv(conv2.weight, cast(Tensor, z.shift), z.height, z.width, z.pad,
                                     cast("tuple[int, int]", conv2.stride)).to(y.dtype))
        accumulate(two.bn(y))
    if avg is not None:
        z = _bn_then_padded(avg.bn1, avg.bn1.bn(by_conv[id(avg.conv1)]))
        y = avg_pool_zero_padded(z.tensor, k, s, z.pad)
        if z.pad:  # in place: neither pooling op keeps its output for backward
            y.add_(padding_term_avg(cast(Tensor, z.shift), z.height, z.width, z.pad, k, s, like=y))
        accumulate(avg.bn(y))


def _fusable_parts(name: str, branch: nn.Module, k: int, s: int) -> list[nn.Module] | None:
    """The modules of ``branch`` the fused forward relies on, or None if the branch is not the
    plain structure :class:`DiverseBranchBlock` builds."""
    sub = branch._modules
    if name in ("kxk", "1x1", "1xk", "kx1"):
        if type(branch) is not ConvBN or type(sub["bn"]) is not nn.BatchNorm2d:
            return None
        conv = sub["conv"]
        if name == KXK and isinstance(conv, RepBlock):
            return [branch, conv, sub["bn"]]  # called as a module: the nested block decides for itself
        if not _plain_conv(conv) or (name == KXK and conv.bias is not None):
            return None
        return [branch, conv, sub["bn"]]
    if name == "identity":
        return [branch, sub["bn"]] if type(branch) is IdentityBN and type(sub["bn"]) is nn.BatchNorm2d else None
    expected = OneByOneKxk if name == "1x1_kxk" else OneByOneAvg
    if type(branch) is not expected or type(sub["bn1"]) is not BNAndPad:
        return None
    bn1 = sub["bn1"]._modules["bn"]
    if type(bn1) is not nn.BatchNorm2d or type(sub["bn"]) is not nn.BatchNorm2d or not _plain_conv(sub["conv1"]):
        return None
    second = sub["conv2"] if name == "1x1_kxk" else sub["avg"]
    if not (_plain_conv(second) if name == "1x1_kxk" else _plain_avg_pool(second, k, s)):
        return None
    return [branch, sub["conv1"], sub["bn1"], bn1, cast(nn.Module, second), sub["bn"]]  # checked just above


# Hook registries torch keeps on every module and globally.  Reading them is the only way to know
# whether a hook would observe the branch modules the fused path bypasses (torch has no public
# query).  If a torch version renames the global ones, the fast path is switched off entirely
# (never silently bypassing a hook); tests/test_dbb.py registers a real global hook to check this.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple(getattr(_torch_module, f"_global{n}") for n in _HOOK_DICTS
                           if hasattr(_torch_module, f"_global{n}"))
_GLOBAL_HOOKS_READABLE = len(_GLOBAL_HOOK_DICTS) == len(_HOOK_DICTS)


def _has_hooks(module: nn.Module) -> bool:
    d = module.__dict__
    return any(d.get(n) for n in _HOOK_DICTS)


def _global_module_hooks() -> bool:
    """True if any global module hook is registered (or the registries cannot be read)."""
    return not _GLOBAL_HOOKS_READABLE or any(_GLOBAL_HOOK_DICTS)


def _plain_conv(conv: nn.Module | None) -> TypeGuard[nn.Conv2d]:
    return (type(conv) is nn.Conv2d and conv.__dict__["_parameters"].get("bias") is None and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _plain_avg_pool(pool: nn.Module | None, k: int, s: int) -> TypeGuard[nn.AvgPool2d]:
    return (type(pool) is nn.AvgPool2d and pool.kernel_size == k and pool.stride == s and pool.padding == 0
            and pool.count_include_pad and not pool.ceil_mode and pool.divisor_override is None)


class _Padded:
    """A BN output meant to be padded by ``pad`` with the per-channel value ``shift`` (not yet padded)."""

    __slots__ = ("height", "pad", "shift", "tensor", "width")

    def __init__(self, tensor: Tensor, shift: Tensor | None, pad: int):
        self.tensor, self.shift, self.pad = tensor, shift, pad
        self.height, self.width = tensor.shape[-2:]


def _bn_then_padded(bnpad: BNAndPad, out: Tensor) -> _Padded:
    """``out`` (``bnpad``'s BN output, just computed) and the pad value ``BNAndPad.forward`` would use
    (after the BN's update)."""
    if bnpad.pad == 0:
        return _Padded(out, None, 0)
    return _Padded(out, pad_value(bnpad), bnpad.pad)
