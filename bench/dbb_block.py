"""Benchmark 2: one 7-branch DiverseBranchBlock (fused forward) against a faithful re-implementation of the
original DyRep block (:mod:`bench.dbb_original`), a plain conv+BN, and the original's convolutions alone
(train mode, forward+backward, same parameters).

``convs_only`` runs just the seven convolutions the original runs (same shapes, no BN, no padding copies, no
sum): no implementation that performs the same convolutions can be faster than it, so
``convs_only_over_original_time`` is the floor of the fused/original time ratio on that machine.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.rep.dbb import DiverseBranchBlock

from .common import interleaved_ratios, peak_memory, saved_tensor_bytes
from .dbb_original import OriginalDBB, original_from_block

# (name, channels, spatial) — the realistic shapes of the issue; batches chosen per device/mode.
SHAPES = (("64x32x32", 64, 32), ("256x14x14", 256, 14))
GOAL_TIME = 0.75
GOAL_MEM = 0.6


def stacked_forward(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """Every branch module on x, stacked into one tensor, summed (the original's summation, on our modules)."""
    return torch.stack([branch(x) for branch in block.branches.values()]).sum(0)


class ConvBNRef(nn.Module):
    def __init__(self, channels: int, device, dtype):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvsOnly(nn.Module):
    """The original block's convolutions and nothing else (see module docstring); the 1x1->kxk branch's
    kxk conv reads a tensor of its padded input's shape, as in the original."""

    def __init__(self, original: OriginalDBB):
        super().__init__()
        self.original = original

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        o = self.original
        outs = [o.dbb_kxk.conv(x), o.dbb_1x1.conv(x), o.dbb_1xk.conv(x), o.dbb_kx1.conv(x),
                o.dbb_1x1_avg.conv(x)]
        mid = o.dbb_1x1_kxk.conv1(x)
        outs.append(o.dbb_1x1_kxk.conv2(F.pad(mid, [o.dbb_1x1_kxk.bn1.pad_pixels] * 4)))
        outs.append(mid)
        return outs


def make_variants(channels: int, device, dtype=torch.float32, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    fused = DiverseBranchBlock(channels, channels, 3, 1, 1, device=device, dtype=dtype)
    assert len(fused.branch_names) == 7 and fused._fusable()
    original = original_from_block(copy.deepcopy(fused))
    return {"conv_bn": ConvBNRef(channels, device, dtype), "dbb_original": original, "dbb_fused": fused,
            "convs_only": ConvsOnly(copy.deepcopy(original))}


def _backward(out, grad: torch.Tensor) -> None:
    if isinstance(out, list):  # convs_only (stride 1, "same" padding: every output has the block's shape)
        torch.autograd.backward(out, [grad] * len(out))
    else:
        out.backward(grad)


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        _backward(module(x), grad)
    return step


def memory_figures(variants: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor,
                   device: torch.device) -> tuple[dict[str, int], dict[str, int]]:
    """Per variant: the peak memory of one fwd+bwd and the bytes autograd saves for backward."""
    mem, saved = {}, {}
    for k, m in variants.items():
        # Parameter/input grads already allocated (zeroed in place): the peak is activations +
        # temporaries of one forward+backward, not the gradient buffers every variant needs.
        _backward(m(x), grad)

        def step(m=m, x=x, grad=grad):
            m.zero_grad(set_to_none=False)
            x.grad.zero_()
            _backward(m(x), grad)

        mem[k] = peak_memory(step, device)
        m.zero_grad(set_to_none=True)
        saved[k] = saved_tensor_bytes(lambda m=m, x=x: m(x))
    return mem, saved


def measure(device: torch.device, batch: int, channels: int, side: int, reps: int) -> dict:
    variants = make_variants(channels, device)
    for m in variants.values():
        m.train()
    x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
    grad = torch.randn(batch, channels, side, side, device=device)
    steps = {k: _fwd_bwd(m, x, grad) for k, m in variants.items()}
    timing = interleaved_ratios(steps, reps=reps, warmup=2, device=device, baseline="dbb_original")
    entry: dict = {"batch": batch, "time_s": {k: v["median_s"] for k, v in timing.items()},
                   "cpu_time_s": {k: v["median_cpu_s"] for k, v in timing.items()}}
    mem, saved = memory_figures(variants, x, grad, device)
    entry["peak_bytes"] = mem
    entry["saved_bytes"] = saved
    entry["activation_unit_bytes"] = batch * channels * side * side * x.element_size()
    for k in ("dbb_fused", "convs_only", "conv_bn"):
        short = k.removeprefix("dbb_")
        entry[f"{short}_over_original_time"] = timing[k]["ratio"]
        entry[f"{short}_over_original_cpu_time"] = timing[k]["cpu_ratio"]
    entry["fused_over_original_peak_mem"] = mem["dbb_fused"] / mem["dbb_original"]
    entry["fused_over_original_saved_mem"] = saved["dbb_fused"] / saved["dbb_original"]
    entry["fused_over_conv_time"] = timing["dbb_fused"]["ratio"] / timing["conv_bn"]["ratio"]
    entry["fused_over_conv_peak_mem"] = mem["dbb_fused"] / mem["conv_bn"]
    entry["met_time"] = entry["fused_over_original_time"] <= GOAL_TIME
    entry["met_mem"] = entry["fused_over_original_peak_mem"] <= GOAL_MEM
    # In a network every block's saved tensors are alive at once: this is the ratio that scales with depth.
    entry["met_saved"] = entry["fused_over_original_saved_mem"] <= GOAL_MEM
    return entry


def run(device: torch.device, quick: bool = False, batches: tuple[int, ...] | None = None, reps: int | None = None,
        shapes=SHAPES, batch: int | None = None) -> dict:
    if batch is not None:
        batches = (batch,)
    if batches is None:
        batches = (32,) if device.type == "cuda" else ((8,) if quick else (16, 32))
    reps = reps or (5 if quick else 11)
    results: dict = {"batches": list(batches), "reps": reps, "shapes": {}, "goal_time": GOAL_TIME,
                     "goal_mem": GOAL_MEM}
    for b in batches:
        for name, channels, side in shapes:
            results["shapes"][f"{name} b{b}"] = measure(device, b, channels, side, reps)
    entries = results["shapes"].values()
    results["met_time"] = all(e["met_time"] for e in entries)
    results["met_mem"] = all(e["met_mem"] and e["met_saved"] for e in entries)
    results["met"] = results["met_time"] and results["met_mem"]
    return results
