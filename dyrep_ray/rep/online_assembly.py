"""The online block's kernel assembly as one autograd node with a hand-written backward.

``assemble_kernel(parts, k, groups)`` returns ``Σ`` of the parts' kxk kernel contributions (each centred in the
kxk window), where a part is

* ``("scaled", W, s)``       ``s * W``                    (kxk / 1x1 / 1xk / kx1 convs, the identity's eye)
* ``("merge", W1, W2, s)``   ``(s * W2) ∘ W1``             (1x1 -> kxk, both with ``groups``)
* ``("avg", W1, s)``         ``s * W1 / k^2`` on every tap (1x1 -> kxk average pool)

Why a custom node: built from autograd ops, the assembly keeps every scaled kernel and product alive for
backward (several kernel-sized tensors per branch: at 32x32 inputs, VGG-16's 512-channel kernels outweigh its
activations) and records ~4 nodes per branch.  This node saves only its inputs (parameters, alive anyway) and
recomputes the one product backward needs (``s * W2``); every gradient is the closed form of the sum above.
Autocast state is the forward's in backward too (the merge's matmuls run in the same precision both ways).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

SCALED, MERGE, AVG = "scaled", "merge", "avg"
_ARITY = {SCALED: 2, MERGE: 3, AVG: 2}

Part = tuple  # (kind, *tensors)


def _channel(scale: Tensor) -> Tensor:
    return scale.reshape(-1, 1, 1, 1)


def _window(size: int, kh: int, kw: int) -> tuple[slice, slice]:
    """Where a centred kh x kw kernel sits in the size x size window."""
    oh, ow = (size - kh) // 2, (size - kw) // 2
    return slice(oh, oh + kh), slice(ow, ow + kw)


def _merge(w1: Tensor, w2s: Tensor, groups: int) -> Tensor:
    out_ch, mid_pg = w2s.shape[0], w2s.shape[1]
    in_pg = w1.shape[1]
    k1g = w1.reshape(groups, mid_pg, in_pg)
    k2g = w2s.reshape(groups, out_ch // groups, mid_pg, *w2s.shape[-2:])
    return torch.einsum("gomhw,gmi->goihw", k2g, k1g).reshape(out_ch, in_pg, *w2s.shape[-2:])


class _AssembleKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kinds: tuple[str, ...], size: int, groups: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        device = tensors[0].device.type
        ctx.kinds, ctx.size, ctx.groups = kinds, size, groups
        ctx.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*tensors)
        acc: Tensor | None = None
        parts = []
        i = 0
        for kind in kinds:
            args = tensors[i:i + _ARITY[kind]]
            i += _ARITY[kind]
            if kind == SCALED:
                w, s = args
                parts.append(w * _channel(s))
            elif kind == MERGE:
                w1, w2, s = args
                parts.append(_merge(w1, w2 * _channel(s), groups))
            else:
                w1, s = args
                parts.append(((w1 * _channel(s)) / (size * size)).expand(*w1.shape[:2], size, size))
        dtype = functools.reduce(torch.promote_types, (part.dtype for part in parts))
        for part in parts:
            kh, kw = part.shape[-2:]
            if acc is None:
                if (kh, kw) == (size, size) and part.dtype == dtype and part.is_contiguous():
                    acc = part  # a fresh product: safe to add into
                    continue
                acc = torch.zeros(*part.shape[:2], size, size, dtype=dtype, device=part.device)
            rows, cols = _window(size, kh, kw)
            acc[:, :, rows, cols].add_(part)  # add_ on the view: no setitem copy
        assert acc is not None
        return acc

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        tensors = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        grads: list[Tensor | None] = []
        size, groups = ctx.size, ctx.groups
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            i = 0
            for kind in ctx.kinds:
                args = tensors[i:i + _ARITY[kind]]
                needs = ctx.needs_input_grad[3 + i:3 + i + _ARITY[kind]]
                i += _ARITY[kind]
                if kind == SCALED:
                    w, s = args
                    g = grad[(slice(None), slice(None), *_window(size, *w.shape[-2:]))]
                    grads.append((g * _channel(s)).to(w.dtype) if needs[0] else None)
                    grads.append((g * w).sum((1, 2, 3)).to(s.dtype) if needs[1] else None)
                elif kind == AVG:
                    w1, s = args
                    g = grad.sum((2, 3), keepdim=True) / (size * size)
                    grads.append((g * _channel(s)).to(w1.dtype) if needs[0] else None)
                    grads.append((g * w1).sum((1, 2, 3)).to(s.dtype) if needs[1] else None)
                else:
                    w1, w2, s = args
                    out_ch, mid_pg = w2.shape[0], w2.shape[1]
                    in_pg = w1.shape[1]
                    gg = grad.reshape(groups, out_ch // groups, in_pg, *grad.shape[-2:])
                    k1g = w1.reshape(groups, mid_pg, in_pg)
                    g_w2s = torch.einsum("goihw,gmi->gomhw", gg, k1g).reshape(w2.shape)
                    if needs[0]:
                        k2g = (w2 * _channel(s)).reshape(groups, out_ch // groups, mid_pg, *w2.shape[-2:])
                        grads.append(torch.einsum("gomhw,goihw->gmi", k2g, gg).reshape(w1.shape).to(w1.dtype))
                    else:
                        grads.append(None)
                    grads.append((g_w2s * _channel(s)).to(w2.dtype) if needs[1] else None)
                    grads.append((g_w2s * w2).sum((1, 2, 3)).to(s.dtype) if needs[2] else None)
        return (None, None, None, *grads)


def assemble_kernel(parts: Sequence[Part], size: int, groups: int) -> Tensor:
    """Σ of ``parts``' contributions as a (out, in/groups, size, size) kernel; see the module docstring."""
    kinds = tuple(part[0] for part in parts)
    for part in parts:
        if part[0] not in _ARITY or len(part) != 1 + _ARITY[part[0]]:
            raise ValueError(f"bad kernel part {part[0]!r} with {len(part) - 1} tensors")
    tensors = [t for part in parts for t in part[1:]]
    return _AssembleKernel.apply(kinds, size, groups, *tensors)
