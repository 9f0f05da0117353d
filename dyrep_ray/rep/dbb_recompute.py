"""Branches of the bn block's fused forward that keep no activation of their own for backward.

Each piece runs its convs and BatchNorms once without autograd (updating the BNs' running statistics
exactly as the modules would), saves only its inputs (the block input and parameters), and in backward
runs again with autograd to get the gradients.  The second run uses each BN's batch statistics
without touching its running statistics (``F.batch_norm`` with no running buffers computes the same
batch mean and variance), so the running stats are updated once, as in the per-branch forward.

Only for BNs in training mode that track running statistics (:func:`recomputable`); the caller
keeps the ordinary path otherwise (eval-mode BNs, autocast, no grad).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import transforms as T
from .dbb_branches import BNAndPad, ConvBN, OneByOneAvg, OneByOneKxk
from .dbb_pad import avg_pool_zero_padded, padding_term_avg, padding_term_conv

# fn(update, *inputs) -> (direct output, input of the conv); update=True: the forward run (BN running stats updated)
Recomputable = Callable[..., tuple["Tensor | None", "Tensor | None"]]


def recomputable(bns: Iterable[nn.BatchNorm2d]) -> bool:
    """True if every BN normalizes with batch statistics and tracks running ones (what ``bn_train`` does)."""
    return all(bn.training and bn.track_running_stats and bn.affine and bn.num_batches_tracked is not None
               for bn in bns)


def bn_train(bn: nn.BatchNorm2d, y: Tensor, weight: Tensor, bias: Tensor, update: bool) -> Tensor:
    """``bn(y)`` in training mode with ``weight``/``bias`` standing for its affine parameters; with
    ``update`` the running statistics advance exactly as ``nn.BatchNorm2d.forward`` advances them."""
    if not update:
        return F.batch_norm(y, None, None, weight, bias, True, 0.0, bn.eps)
    tracked = cast(Tensor, bn.num_batches_tracked)
    tracked.add_(1)
    factor = 1.0 / float(tracked) if bn.momentum is None else bn.momentum  # as nn.BatchNorm2d (its sync too)
    return F.batch_norm(y, bn.running_mean, bn.running_var, weight, bias, True, factor, bn.eps)


def pad_value(bnpad: BNAndPad) -> Tensor:
    """The per-channel value ``BNAndPad.forward`` pads with (from the running stats, detached)."""
    bn = bnpad.bn
    _, shift = T.bn_scale_shift(cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var), bn.weight.detach(),
                                bn.bias.detach(), bn.eps)
    return shift


def _detached_inputs(saved: Iterable[Tensor], needs: Iterable[bool]) -> list[Tensor]:
    return [t.detach().requires_grad_(need) for t, need in zip(saved, needs)]


class _Recomputed(torch.autograd.Function):
    """``direct, z = fn(True, *inputs)``; returns ``direct`` and/or ``conv2d(z, weight) + ring`` (whichever
    exists, in that order).  Saves ``inputs`` and ``weight`` only: backward re-runs ``fn(False, *inputs)``
    with autograd (see module docstring) and does the conv's backward from the recomputed ``z`` (the conv
    itself is not re-run).  ``ring`` is the bias-padding term of :func:`~.dbb_pad.padding_term_conv` for
    the pad value ``conv[2]()`` read right after ``fn``'s BN update, as ``BNAndPad`` reads it."""

    @staticmethod
    def forward(ctx, fn: Recomputable, conv: tuple[int, int, Callable[[], Tensor]] | None, weight: Tensor | None,
                *inputs: Tensor):
        direct, z = fn(True, *inputs)
        outs = [] if direct is None else [direct]
        ctx.shift = None
        if conv is not None and z is not None and weight is not None:
            stride, pad, shift_fn = conv
            y = F.conv2d(z, weight, None, stride, pad)
            if pad:
                ctx.shift = shift_fn()
                y.add_(padding_term_conv(weight, ctx.shift, z.shape[-2], z.shape[-1], pad, (stride, stride))
                       .to(y.dtype))
            outs.append(y)
            ctx.conv, ctx.zsize = (stride, pad), z.shape[-2:]
        ctx.fn, ctx.direct = fn, direct is not None
        ctx.save_for_backward(weight, *inputs)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        weight, *saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = _detached_inputs(saved, ctx.needs_input_grad[3:])
            direct, z = ctx.fn(False, *inputs)
        roots, root_grads, grad_w = [], [], None
        if ctx.direct:
            roots.append(direct)
            root_grads.append(grads[0])
        if weight is not None:
            grad, (s, p) = grads[-1], ctx.conv
            need_w = ctx.needs_input_grad[2]
            gz, grad_w, _ = torch.ops.aten.convolution_backward(grad, z.detach(), weight, None, [s, s], [p, p], [1, 1],
                                                                False, [0, 0], 1, [True, need_w, False])
            if need_w and ctx.shift is not None:
                with torch.enable_grad():
                    w = weight.detach().requires_grad_()
                    ring = padding_term_conv(w, ctx.shift, ctx.zsize[0], ctx.zsize[1], p, (s, s))
                grad_w = grad_w + torch.autograd.grad(ring, w, grad.sum(0, keepdim=True).to(ring.dtype))[0]
            roots.append(z)
            root_grads.append(gz)
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(roots, wanted, root_grads) if wanted else ())
        return (None, None, grad_w, *(next(got) if t.requires_grad else None for t in inputs))


def one_by_one_readers(x: Tensor, k: int, s: int, one: ConvBN | None, two: OneByOneKxk | None,
                       avg: OneByOneAvg | None) -> tuple[Tensor | None, Tensor | None]:
    """The branches that start with a 1x1 conv on ``x`` (``one`` only at stride 1), keeping no activation of
    their own for backward: ``(one(x) + avg(x), two's kxk conv output before its last BN)`` (None where the
    branch is absent).  Their 1x1 convs run as one conv on the concatenated weights, in forward and again
    in backward."""
    parts: list[tuple[str, nn.Module]] = [(n, b) for n, b in (("1x1", one), ("1x1_kxk", two), ("1x1_avg", avg))
                                          if b is not None]
    convs = [cast(nn.Conv2d, b.conv if n == "1x1" else b.conv1) for n, b in parts]
    sizes = [c.out_channels for c in convs]
    inputs: list[Tensor] = [x, *(c.weight for c in convs)]
    # The BN right after each 1x1 conv, then the avg branch's last BN; their weights and biases follow in inputs.
    firsts = [cast(ConvBN, b).bn if n == "1x1" else cast(BNAndPad, b.bn1).bn for n, b in parts]
    bns = firsts + ([avg.bn] if avg is not None else [])
    for bn in bns:
        inputs += [bn.weight, bn.bias]
    shifts: list[Tensor] = []  # the avg branch's pad value in the forward run, reused by the recompute

    def fn(update: bool, x: Tensor, *params: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weights, affine = params[:len(convs)], params[len(convs):]
        y = F.conv2d(x, torch.cat(weights)) if len(weights) > 1 else F.conv2d(x, weights[0])
        # Each BN on its own slice of y (no contiguous copies, no one BN over all of y: either would hold a
        # second y-sized tensor at the backward's peak).
        normed = {n: bn_train(bn, t, affine[2 * i], affine[2 * i + 1], update)
                  for i, ((n, _), bn, t) in enumerate(zip(parts, firsts, y.split(sizes, dim=1)))}
        direct = z = None
        if one is not None:
            direct = normed["1x1"]
        if two is not None:
            z = normed["1x1_kxk"]
        if avg is not None:
            za = normed["1x1_avg"]
            pad = avg.bn1.pad
            ya = avg_pool_zero_padded(za, k, s, pad)
            if pad:
                if update:
                    shifts.append(pad_value(avg.bn1))
                # in place: neither pooling op keeps its output for backward
                ya.add_(padding_term_avg(shifts[0], za.shape[-2], za.shape[-1], pad, k, s, like=ya))
            ya = bn_train(avg.bn, ya, affine[-2], affine[-1], update)
            direct = ya if direct is None else direct + ya
        return direct, z

    conv = None if two is None else (cast("tuple[int, int]", two.conv2.stride)[0], two.bn1.pad,
                                     lambda: pad_value(two.bn1))
    outs = list(_Recomputed.apply(fn, conv, None if two is None else two.conv2.weight, *inputs))
    direct = outs.pop(0) if (one is not None or avg is not None) else None
    return direct, (outs.pop(0) if two is not None else None)
