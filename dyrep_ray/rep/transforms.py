"""Pure tensor maths of structural re-parameterization.

Every function here takes and returns tensors only: no modules are created or
mutated, so each identity can be tested in isolation.  Kernels use the
``nn.Conv2d`` layout ``(out_channels, in_channels // groups, kh, kw)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` such that eval-mode ``BN(x) == scale * x + shift``."""
    std = torch.sqrt(running_var + eps)
    gamma = weight if weight is not None else torch.ones_like(running_mean)
    beta = bias if bias is not None else torch.zeros_like(running_mean)
    scale = gamma / std
    return scale, beta - running_mean * scale


def fuse_conv_bn(
    kernel: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv: returns ``(kernel, bias)``."""
    scale, shift = bn_scale_shift(running_mean, running_var, gamma, beta, eps)
    fused_kernel = kernel * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv_bias is None else shift + conv_bias * scale
    return fused_kernel, bias


def pad_kernel_to(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a (kh, kw) kernel symmetrically to (size, size); odd size differences only."""
    kh, kw = kernel.shape[-2:]
    dh, dw = size - kh, size - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
    return F.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


def merge_1x1_kxk(
    k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Merge ``conv_kxk(k2, b2) ∘ conv_1x1(k1, b1)`` (both with ``groups``) into one kxk conv.

    The 1x1 output must be padded with its own bias (not zero) for the identity to
    be exact at the borders; :class:`~dyrep_ray.rep.dbb_branches.BNAndPad` does that.
    ``k1``: (mid, in/g, 1, 1); ``k2``: (out, mid/g, k, k).
    """
    out_ch, mid_per_group = k2.shape[0], k2.shape[1]
    in_per_group = k1.shape[1]
    out_per_group = out_ch // groups
    # k1 per group as a matrix (mid/g, in/g); k2 per group (out/g, mid/g, k, k).
    k1g = k1.reshape(groups, mid_per_group, in_per_group)
    k2g = k2.reshape(groups, out_per_group, mid_per_group, *k2.shape[-2:])
    merged = torch.einsum("gomhw,gmi->goihw", k2g, k1g).reshape(out_ch, in_per_group, *k2.shape[-2:])
    b1g = b1.reshape(groups, mid_per_group)
    bias = torch.einsum("gomhw,gm->go", k2g, b1g).reshape(out_ch) + b2
    return merged, bias


def merge_1x1_avg(k1: Tensor, b1: Tensor, kernel_size: int, scale2: Tensor, shift2: Tensor) -> tuple[Tensor, Tensor]:
    """``BN(avg_pool_kxk(conv_1x1(k1, b1)))`` as one kxk conv, the BN given as ``scale2``/``shift2``
    (:func:`bn_scale_shift`): what :func:`merge_1x1_kxk` gives with the BN-fused :func:`avg_pool_kernel`, in
    closed form.  The pool is per channel, so output channel ``o`` is ``scale2[o] * k1[o] / k^2`` on every tap
    (with any ``groups``), and the bias ``shift2 + scale2 * b1`` (the pool's taps sum to 1; the 1x1 output is
    padded with its bias, as for :func:`merge_1x1_kxk`).  ``k1``: (out, in/g, 1, 1).  No out*out*in*k^2 merge."""
    per_tap = k1 * (scale2 / (kernel_size * kernel_size)).reshape(-1, 1, 1, 1)
    kernel = per_tap.expand(*k1.shape[:2], kernel_size, kernel_size).contiguous()
    return kernel, shift2 + scale2 * b1


def avg_pool_kernel(channels: int, kernel_size: int, groups: int, like: Tensor) -> Tensor:
    """Kernel of ``AvgPool2d(kernel_size)`` (count_include_pad) as a grouped conv on ``channels``."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group] = 1.0 / (kernel_size * kernel_size)
    return kernel


def identity_kernel(channels: int, kernel_size: int, groups: int, like: Tensor) -> Tensor:
    """Kernel of the identity map as a grouped kxk conv on ``channels`` (in == out)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    centre = kernel_size // 2
    kernel[idx, idx % per_group, centre, centre] = 1.0
    return kernel


def sum_branches(kernels: list[Tensor], biases: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Parallel branches on the same input add up: sum their kernels and biases."""
    if not kernels:
        raise ValueError("no branches to sum")
    return torch.stack(kernels).sum(0), torch.stack(biases).sum(0)
