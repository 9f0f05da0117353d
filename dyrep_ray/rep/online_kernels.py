"""Pure kernel maths of the online (OREPA-style) block: functions of tensors (and, for :func:`used_taps`, of
shapes) without side effects.

Kernels use the ``nn.Conv2d`` layout ``(out_channels, in_channels // groups, kh, kw)``; a per-channel
``scale`` has shape ``(out_channels,)``.  All functions are differentiable (the block's kernel is
assembled from them on every training step), and none allocates more than one kernel-sized tensor.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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


#: Rows ``[top, bottom)`` and columns ``[left, right)`` of a kxk kernel: the taps a conv uses on an input shape.
TapWindow = tuple[int, int, int, int]


def _live_taps(size: int, k: int, stride: int, padding: int) -> tuple[int, int]:
    """``[first, last + 1)`` of the taps along one axis that read an input pixel (not padding) for some output."""
    outputs = (size + 2 * padding - k) // stride + 1
    live = [i for i in range(k) if any(0 <= o * stride + i - padding < size for o in range(outputs))]
    return (live[0], live[-1] + 1) if live else (0, k)


@functools.lru_cache(maxsize=4096)
def used_taps(height: int, width: int, k: int, stride: int, padding: int) -> TapWindow | None:
    """The taps of a kxk conv (``stride``, symmetric ``padding``) that read input on a ``height`` x ``width`` map,
    when some never do (a 3x3 conv, padding 1, on a 1x1 map reads only its centre tap), else None.

    A conv with only those taps and padding ``padding - top`` / ``padding - left`` computes the same output, pixel
    for pixel: each output reads the same input positions through the same taps; the dropped taps only ever
    multiply zero padding.  None too where that symmetric padding would not give the same output size.
    """
    top, bottom = _live_taps(height, k, stride, padding)
    left, right = _live_taps(width, k, stride, padding)
    if (top, bottom, left, right) == (0, k, 0, k):
        return None
    pad_h, pad_w = padding - top, padding - left
    if pad_h < 0 or pad_w < 0:
        return None
    for size, pad, taps in ((height, pad_h, bottom - top), (width, pad_w, right - left)):
        if (size + 2 * pad - taps) // stride != (size + 2 * padding - k) // stride:
            return None
    return top, bottom, left, right


def crop_to_taps(kernel: Tensor, k: int, window: TapWindow) -> Tensor:
    """The ``window`` of the kxk kernel that ``kernel`` (kh x kw, centred in k x k) contributes to: its taps inside
    the window, zeros elsewhere -- the same as cropping ``pad_kernel_to(kernel, k)``, without building it."""
    top, bottom, left, right = window
    kh, kw = kernel.shape[-2:]
    off_h, off_w = (k - kh) // 2, (k - kw) // 2
    r0, r1 = max(top, off_h), min(bottom, off_h + kh)
    c0, c1 = max(left, off_w), min(right, off_w + kw)
    if r0 >= r1 or c0 >= c1:  # every tap of this kernel is outside the window
        return kernel.new_zeros(*kernel.shape[:2], bottom - top, right - left)
    part = kernel[..., r0 - off_h:r1 - off_h, c0 - off_w:c1 - off_w]
    pad = [c0 - left, right - c1, r0 - top, bottom - r1]
    return F.pad(part, pad) if any(pad) else part
