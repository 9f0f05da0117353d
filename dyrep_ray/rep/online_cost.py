"""Cost model of the online block's forward paths (:meth:`~dyrep_ray.rep.online.OnlineBlock.path_for`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .geometry import KXK
from .online_kernels import TapWindow, used_taps

# In multiply-accumulates:
# one element of an elementwise pass costs about as much as this many conv MACs (memory-bound vs compute-bound)
ELEMENTWISE_MACS = 8
# a conv's cost per MAC grows on tiny output maps (padding, im2col and launch overhead per pixel):
# MACs * (1 + SMALL_MAP_PIXELS / output pixels).  Fitted, with ELEMENTWISE_MACS, to CPU fwd+bwd timings of
# one block at 64-512 channels on 2x2-16x16 maps, batch 32 (docs/benchmarks.md)
SMALL_MAP_PIXELS = 4
KERNEL_PASSES_PER_BRANCH = 4  # kernel-sized elementwise passes per branch per training step (fwd + bwd)
OUTPUT_PASSES_PER_BRANCH = 4  # output-sized passes per branch (scale, sum; fwd + bwd)
# OnlineBlock.forward_path values; SPLIT_PATH: every branch assembled but the 1x1->kxk one, which runs on the
# activations (its kernel merge is the one assembly that costs convolution-sized work)
AUTO_PATH, KERNEL_PATH, BRANCHES_PATH, SPLIT_PATH = "auto", "kernel", "branches", "split"
SPLIT_BRANCH = "1x1_kxk"


def tap_count(window: TapWindow | None, k: int) -> int:
    """Taps a kxk conv computes with only ``window``'s taps (:func:`~dyrep_ray.rep.online_kernels.used_taps`)."""
    return k * k if window is None else (window[1] - window[0]) * (window[3] - window[2])


def conv_geometry(block: Any, x: Tensor) -> tuple[int, int, int, int, int, int]:
    """``(n, h, w, pixels_out, cin, cout)`` of the block's kxk conv on ``x``: batch and input map size, output
    pixels over the whole batch, input channels per group, output channels."""
    g, k, s, p = block.groups, block.kernel_size, block.stride, block.padding
    n, _, h, w = x.shape
    pixels_out = n * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)
    return int(n), int(h), int(w), int(pixels_out), block.in_channels // g, block.out_channels


def path_costs(block: Any, x: Tensor) -> dict[str, int]:
    """Estimated multiply-accumulates of one training step of each forward path on ``x``'s shape.

    Assembling (``kernel``) costs the kxk conv on ``x``, the 1x1->kxk kernel merge (out*mid*in*k^2/g^2
    MACs whatever the batch) and a few elementwise passes over a kernel-sized tensor per branch; running
    every branch (``branches``) costs every branch's conv on ``x`` and a few passes over its output;
    ``split`` assembles every branch but the 1x1->kxk one, which runs its two convs on ``x``.  Wide convs
    on tiny activations (VGG-16's 512-channel layers at 2x2-4x4 pixels on 32x32 inputs) are where the
    merge costs more than the convs it saves; everywhere else the block is one conv.
    """
    g, k = block.groups, block.kernel_size
    n, h, w, pixels_out, cin, cout = conv_geometry(block, x)
    # the assembled paths use only the taps that read input (all k*k but on maps smaller than the kernel's reach)
    taps = tap_count(used_taps(h, w, k, block.stride, block.padding), k)
    kernel_numel, out_numel = cout * cin * taps, pixels_out * cout
    nb = len(block.branches)
    small_map = 1.0 + SMALL_MAP_PIXELS * n / max(pixels_out, 1)  # conv cost per MAC on this output map
    kxk_conv = pixels_out * cout * cin * taps * small_map
    assembled = kxk_conv + ELEMENTWISE_MACS * KERNEL_PASSES_PER_BRANCH * nb * kernel_numel
    on_activations = (pixels_out * cout * cin * k * k * small_map
                      + ELEMENTWISE_MACS * OUTPUT_PASSES_PER_BRANCH * nb * out_numel)
    split_conv = 0.0  # the 1x1->kxk branch's convs on the activations
    for name, branch in block.branches.items():
        if name == SPLIT_BRANCH:  # 1x1 -> kxk
            mid = branch.conv1.out_channels
            assembled += cout * mid * cin * taps // g
            split_conv = (n * h * w * mid * cin + pixels_out * cout * (mid // g) * taps) * small_map
            on_activations += (n * h * w * mid * cin + pixels_out * cout * (mid // g) * k * k) * small_map
        elif name == "1x1_avg":
            on_activations += n * h * w * cout * cin * small_map + out_numel * k * k
        elif name in ("1x1", "1xk", "kx1"):
            on_activations += pixels_out * cout * cin * (1 if name == "1x1" else k) * small_map
    costs = {KERNEL_PATH: assembled, BRANCHES_PATH: on_activations}
    if SPLIT_BRANCH in block.branches:
        costs[SPLIT_PATH] = (kxk_conv + ELEMENTWISE_MACS * KERNEL_PASSES_PER_BRANCH * (nb - 1) * kernel_numel
                             + split_conv + ELEMENTWISE_MACS * OUTPUT_PASSES_PER_BRANCH * out_numel)
    return {path: int(cost) for path, cost in costs.items()}


def activation_macs(block: Any, x: Tensor, path: str, window: TapWindow | None) -> int:
    """Multiply-accumulates of the convs the online block ``block`` runs on ``x`` on ``path``, with the kernel taps
    of ``window`` (:func:`~dyrep_ray.rep.online_kernels.used_taps`) on the assembled paths.

    On the kernel path one kxk conv (the kernel assembly is weight-only, batch-independent work, and absent after
    deploy: not counted); on the branches path every branch's convs, except a nested block in the kxk slot, which
    is called as a module and counts itself; on the split path the assembled conv and the 1x1->kxk branch's.
    Average pooling and the identity are not MACs (as for the bn block).
    """
    g = block.groups
    n, h, w, pixels_out, cin, cout = conv_geometry(block, x)
    taps = tap_count(window, block.kernel_size)
    if path == KERNEL_PATH:
        return pixels_out * cout * cin * taps
    total = 0
    for name, branch in block.branches.items():
        if path == SPLIT_PATH and name not in (KXK, SPLIT_BRANCH):
            continue  # assembled into the kxk conv's kernel
        if name == SPLIT_BRANCH:  # 1x1 -> kxk
            mid = int(branch.conv1.out_channels)
            total += n * h * w * mid * cin + pixels_out * cout * (mid // g) * taps
        elif name == "1x1_avg":
            total += n * h * w * cout * cin
        elif name in (KXK, "1x1", "1xk", "kx1") and isinstance(branch.conv, nn.Conv2d):  # not a nested block
            kh, kw = branch.conv.kernel_size
            total += pixels_out * cout * cin * (taps if name == KXK else kh * kw)
    return total
