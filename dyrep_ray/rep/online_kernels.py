"""Pure kernel maths of the online (OREPA-style) block: every function takes and returns tensors.

Kernels use the ``nn.Conv2d`` layout ``(out_channels, in_channels // groups, kh, kw)``; a per-channel
``scale`` has shape ``(out_channels,)``.  All functions are differentiable (the block's kernel is
assembled from them on every training step), and none allocates more than one kernel-sized tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def scale_kernel(kernel: Tensor, scale: Tensor) -> Tensor:
    """``kernel`` with output channel ``o`` multiplied by ``scale[o]``."""
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1)))


def merge_1x1_kxk_kernel(k1: Tensor, k2: Tensor, groups: int) -> Tensor:
    """Kernel of ``conv_kxk(k2) ∘ conv_1x1(k1)`` (both bias-free, both with ``groups``) as one kxk conv.

    Bias-free, so zero padding of the 1x1 output is already exact (no bias-valued border needed).
    ``k1``: (mid, in/g, 1, 1); ``k2``: (out, mid/g, kh, kw).
    """
    out_ch, mid_per_group = k2.shape[0], k2.shape[1]
    in_per_group = k1.shape[1]
    k1g = k1.reshape(groups, mid_per_group, in_per_group)
    k2g = k2.reshape(groups, out_ch // groups, mid_per_group, *k2.shape[-2:])
    return torch.einsum("gomhw,gmi->goihw", k2g, k1g).reshape(out_ch, in_per_group, *k2.shape[-2:])


def avg_branch_kernel(k1: Tensor, kernel_size: int) -> Tensor:
    """Kernel of ``avg_pool_kxk(count_include_pad) ∘ conv_1x1(k1)`` with ``groups`` of the 1x1.

    The average pool is per channel, so output channel ``o`` of the merge is ``k1[o] / k^2`` on every tap
    (with any ``groups``): ``k1`` (out, in/g, 1, 1) -> (out, in/g, k, k).
    """
    return (k1 / (kernel_size * kernel_size)).expand(*k1.shape[:2], kernel_size, kernel_size)


def identity_matrix(channels: int, groups: int, like: Tensor) -> Tensor:
    """(channels, channels/groups, 1, 1): the identity map as a grouped 1x1 kernel (in == out)."""
    per_group = channels // groups
    eye = torch.zeros(channels, per_group, 1, 1, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    eye[idx, idx % per_group] = 1.0
    return eye
