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
import torch.nn.grad  # noqa: F401  (a submodule torch.nn does not re-export; used in _BoxFilter.backward)
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from . import transforms as T
from .block_base import RepBlock
from .dbb_branches import BNAndPad, ConvBN, IdentityBN, OneByOneAvg, OneByOneKxk
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
    """The same function (and the same BN running-stat updates) as the block's per-branch forward, faster.

    * the 1x1 convs that read ``x`` at stride 1 (``1x1`` when stride is 1, and the first conv of
      ``1x1_kxk`` / ``1x1_avg``) run as one conv on their concatenated weights (``torch.cat`` in
      the graph, so each Parameter gets its gradient); each slice then goes through its own BN;
    * ``BNAndPad`` + unpadded kxk conv / avg-pool becomes a zero-padded conv / avg-pool plus a
      tiny input-independent border term (the bias padding's contribution), so no padded copy
      of the activation is made and the three elementwise passes of ``BNAndPad`` disappear;
    * branch outputs are accumulated in place into one tensor the block owns.
    Every BatchNorm is still its own module, called once on its own branch's tensor, so batch
    statistics, running-stat updates (momentum, ``num_batches_tracked``) and train/eval flags are
    exactly per branch.
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

    # 1x1 convs reading x at stride 1: one GEMM over their concatenated weights.
    readers: list[nn.Conv2d] = []
    if one is not None and s == 1:
        readers.append(cast(nn.Conv2d, one.conv))
    readers += [b.conv1 for b in (two, avg) if b is not None]
    if len(readers) > 1:
        weight = torch.cat([c.weight for c in readers])
        outs = F.conv2d(x, weight).split([c.out_channels for c in readers], dim=1)
    else:
        outs = [c(x) for c in readers]
    outs = dict(zip((id(c) for c in readers), outs))
    if one is not None:
        y = outs[id(one.conv)] if s == 1 else one.conv(x)
        accumulate(one.bn(y))
    if two is not None:
        z = _bn_then_padded(two.bn1, outs[id(two.conv1)])
        conv2 = two.conv2
        y = F.conv2d(z.tensor, conv2.weight, None, conv2.stride, z.pad)
        if z.pad:  # in place: a conv does not keep its output for backward
            y.add_(_padding_term_conv(conv2.weight, cast(Tensor, z.shift), z.height, z.width, z.pad,
                                      cast("tuple[int, int]", conv2.stride)).to(y.dtype))
        accumulate(two.bn(y))
    if avg is not None:
        z = _bn_then_padded(avg.bn1, outs[id(avg.conv1)])
        y = _avg_pool_zero_padded(z.tensor, k, s, z.pad)
        if z.pad:  # in place: neither pooling op keeps its output for backward
            y.add_(_padding_term_avg(cast(Tensor, z.shift), z.height, z.width, z.pad, k, s, like=y))
        accumulate(avg.bn(y))
    for name in ("1xk", "kx1", "identity"):
        if name in br:
            accumulate(br[name](x))
    return out


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


def _bn_then_padded(bnpad: BNAndPad, y: Tensor) -> _Padded:
    """``bnpad``'s BN on ``y`` and the pad value ``BNAndPad.forward`` would use (after the BN's update)."""
    out = bnpad.bn(y)
    if bnpad.pad == 0:
        return _Padded(out, None, 0)
    bn = bnpad.bn
    _, shift = T.bn_scale_shift(cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var), bn.weight.detach(),
                                bn.bias.detach(), bn.eps)  # the block's BNs track running stats
    return _Padded(out, shift, bnpad.pad)


def _border_mask(height: int, width: int, pad: int, like: Tensor) -> Tensor:
    """(1, 1, H + 2p, W + 2p): 1 on the padding ring, 0 inside."""
    mask = torch.ones(1, 1, height + 2 * pad, width + 2 * pad, dtype=like.dtype, device=like.device)
    mask[..., pad:pad + height, pad:pad + width] = 0
    return mask


def _padding_term_conv(weight: Tensor, shift: Tensor, height: int, width: int, pad: int,
                       stride: tuple[int, int]) -> Tensor:
    """conv(pad(z, shift)) - conv(pad(z, 0)): what the bias-valued padding adds, shape (1, C_out, Ho, Wo).

    Input-independent: the per-channel pad values contracted with the kernel, convolved with the
    padding ring.  Differentiable w.r.t. ``weight``; ``shift`` is detached (as in ``BNAndPad``).
    """
    shift = shift.to(weight.dtype)
    ring_kernel = torch.einsum("ocuv,c->ouv", weight, shift).unsqueeze(1)  # (C_out, 1, k, k)
    return F.conv2d(_border_mask(height, width, pad, weight), ring_kernel, None, stride)


def _avg_pool_zero_padded(z: Tensor, k: int, s: int, pad: int, box_filter: bool | None = None) -> Tensor:
    """avg_pool(pad(z, 0), k, s) with divisor k*k.

    On the CPU (outside autocast; ``box_filter=None``) as a depthwise conv with a constant 1/k^2
    kernel: the same sum, ~2.5x faster forward+backward there than ``avg_pool2d`` (whose CPU kernels
    are slow), and its input is not kept for backward.
    """
    if box_filter is None:
        box_filter = z.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if box_filter:
        box = torch.full((z.shape[1], 1, k, k), 1.0 / (k * k), dtype=z.dtype, device=z.device)
        return _BoxFilter.apply(z, box, s, pad)
    if 2 * pad <= k:
        return F.avg_pool2d(z, k, s, pad, count_include_pad=True)
    return F.avg_pool2d(F.pad(z, [pad] * 4), k, s, 0)  # avg_pool2d refuses padding > k / 2


class _BoxFilter(torch.autograd.Function):
    """Depthwise conv with a constant kernel that, unlike ``F.conv2d``, does not keep its input
    alive for backward (the input gradient needs only the kernel)."""

    @staticmethod
    def forward(ctx, z: Tensor, box: Tensor, stride: int, pad: int) -> Tensor:
        ctx.input_shape, ctx.stride, ctx.pad = z.shape, stride, pad
        ctx.save_for_backward(box)
        return F.conv2d(z, box, None, stride, pad, 1, box.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (box,) = ctx.saved_tensors
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, box, grad, ctx.stride, ctx.pad, 1, box.shape[0])
        return grad_input, None, None, None


def _padding_term_avg(shift: Tensor, height: int, width: int, pad: int, k: int, s: int, like: Tensor) -> Tensor:
    """avg_pool(pad(z, shift)) - avg_pool(pad(z, 0)), shape (1, C, Ho, Wo)."""
    fraction = F.avg_pool2d(_border_mask(height, width, pad, like), k, s, 0)
    return shift.to(like.dtype).reshape(1, -1, 1, 1) * fraction
