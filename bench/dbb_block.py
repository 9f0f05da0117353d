"""Benchmark 2: one 7-branch DiverseBranchBlock (fused forward) vs a plain conv+BN and vs the
straightforward "run every branch, stack, sum" implementation of the same block (train mode)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dyrep_ray.rep.dbb import DiverseBranchBlock

from .common import interleaved_ratios, peak_memory, saved_tensor_bytes

# (name, channels, spatial) — the realistic shapes of the issue; batch chosen per device/mode.
SHAPES = (("64x32x32", 64, 32), ("256x14x14", 256, 14))


def stacked_forward(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """The straightforward block: every branch module on x, stacked into one tensor, summed."""
    return torch.stack([branch(x) for branch in block.branches.values()]).sum(0)


class StackedBlock(nn.Module):
    """Baseline wrapper: same modules (state_dict keys, BNs) as ``block``, forward by stack+sum."""

    def __init__(self, block: DiverseBranchBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stacked_forward(self.block, x)


class ConvBNRef(nn.Module):
    def __init__(self, channels: int, device, dtype):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x):
        return self.bn(self.conv(x))


def make_variants(channels: int, device, dtype=torch.float32, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    fused = DiverseBranchBlock(channels, channels, 3, 1, 1, device=device, dtype=dtype)
    assert len(fused.branch_names) == 7 and fused._fusable()
    stacked = StackedBlock(copy.deepcopy(fused))
    return {"conv_bn": ConvBNRef(channels, device, dtype), "dbb_stack_sum": stacked, "dbb_fused": fused}


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        out.backward(grad)
    return step


def run(device: torch.device, quick: bool = False, batch: int | None = None, reps: int | None = None,
        shapes=SHAPES) -> dict:
    if batch is None:
        batch = 32 if device.type == "cuda" else (8 if quick else 16)
    reps = reps or (5 if quick else 15)
    results = {"batch": batch, "reps": reps, "shapes": {}}
    for name, channels, side in shapes:
        variants = make_variants(channels, device)
        for m in variants.values():
            m.train()
        x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
        grad = torch.randn(batch, channels, side, side, device=device)
        steps = {k: _fwd_bwd(m, x, grad) for k, m in variants.items()}
        timing = interleaved_ratios(steps, reps=reps, warmup=2, device=device, baseline="dbb_stack_sum")
        entry = {"time_s": {k: v["median_s"] for k, v in timing.items()},
                 "cpu_time_s": {k: v["median_cpu_s"] for k, v in timing.items()}}
        # peak memory of one fwd+bwd (params' grads freed first), and bytes saved for backward
        mem, saved = {}, {}
        for k, m in variants.items():
            # Parameter/input grads already allocated (zeroed in place): the peak is activations +
            # temporaries of one forward+backward, not the gradient buffers every variant needs.
            m(x).backward(grad)

            def step(m=m, x=x, grad=grad):
                m.zero_grad(set_to_none=False)
                x.grad.zero_()
                m(x).backward(grad)

            mem[k] = peak_memory(step, device)
            m.zero_grad(set_to_none=True)
            saved[k] = saved_tensor_bytes(lambda m=m, x=x: m(x))
        act = batch * channels * side * side * x.element_size()
        entry["peak_bytes"] = mem
        entry["saved_bytes"] = saved
        entry["activation_unit_bytes"] = act
        entry["fused_over_stack_time"] = timing["dbb_fused"]["ratio"]
        entry["fused_over_stack_cpu_time"] = timing["dbb_fused"]["cpu_ratio"]
        entry["stack_over_conv_time"] = 1.0 / timing["conv_bn"]["ratio"]
        entry["fused_over_conv_time"] = timing["dbb_fused"]["ratio"] / timing["conv_bn"]["ratio"]
        entry["fused_over_conv_cpu_time"] = timing["dbb_fused"]["cpu_ratio"] / timing["conv_bn"]["cpu_ratio"]
        entry["fused_over_stack_peak_mem"] = mem["dbb_fused"] / mem["dbb_stack_sum"]
        entry["fused_over_conv_peak_mem"] = mem["dbb_fused"] / mem["conv_bn"]
        entry["fused_over_stack_saved_mem"] = saved["dbb_fused"] / saved["dbb_stack_sum"]
        results["shapes"][name] = entry
    results["goal_time"] = 0.75
    results["goal_mem"] = 0.6
    results["met_time"] = all(e["fused_over_stack_time"] <= 0.75
                              for e in results["shapes"].values())
    results["met_mem"] = all(e["fused_over_stack_peak_mem"] <= 0.6 for e in results["shapes"].values())
    results["met"] = results["met_time"] and results["met_mem"]
    return results
