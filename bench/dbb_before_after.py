"""Benchmark 2 before/after: a previous version of ``rep/dbb_fused.py`` next to the current one, in one process.

    git show <commit>:dyrep_ray/rep/dbb_fused.py > /tmp/dbb_fused_before.py
    python -m bench.dbb_before_after /tmp/dbb_fused_before.py [reps]

Both forwards run on copies of the same block; ratios (wall, CPU time, live peak, saved-for-backward bytes) to
the faithful original (:mod:`bench.dbb_original`), with the original's convolutions alone as the time floor.
The previous module must be self-contained apart from imports within ``dyrep_ray.rep``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import torch
from torch import nn

from dyrep_ray.rep.dbb import DiverseBranchBlock

from .common import interleaved_ratios
from .dbb_block import SHAPES, ConvsOnly, _fwd_bwd, memory_figures
from .dbb_original import original_from_block


def load_previous(path: str):
    spec = importlib.util.spec_from_file_location("dyrep_ray.rep._dbb_fused_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Before(nn.Module):
    def __init__(self, block: DiverseBranchBlock, previous):
        super().__init__()
        self.block, self.previous = block, previous

    def forward(self, x):
        return self.previous.forward_fused(self.block, x)


def run(previous_path: str, reps: int = 11, batches=(16, 32), shapes=SHAPES) -> dict:
    previous = load_previous(previous_path)
    cpu = torch.device("cpu")
    out = {}
    for batch in batches:
        for name, c, side in shapes:
            torch.manual_seed(0)
            block = DiverseBranchBlock(c, c, 3, 1, 1)
            block.train()
            original = original_from_block(copy.deepcopy(block))
            mods = {"original": original, "before": Before(copy.deepcopy(block), previous), "after": block,
                    "convs_only": ConvsOnly(copy.deepcopy(original))}
            x = torch.randn(batch, c, side, side, requires_grad=True)
            g = torch.randn(batch, c, side, side)

            t = interleaved_ratios({k: _fwd_bwd(m, x, g) for k, m in mods.items()}, reps=reps, warmup=2,
                                   baseline="original")
            mem, saved = memory_figures(mods, x, g, cpu)
            out[f"{name} b{batch}"] = {k: {"wall": t[k]["ratio"], "cpu": t[k]["cpu_ratio"],
                                           "peak": mem[k] / mem["original"], "saved": saved[k] / saved["original"],
                                           "peak_mib": mem[k] / 2**20, "saved_mib": saved[k] / 2**20}
                                       for k in mods}
    return out


def markdown(result: dict) -> str:
    lines = ["| shape | variant | time (wall / CPU) | peak fwd+bwd | saved for backward |", "|---|---|---|---|---|"]
    for shape, row in result.items():
        for k, v in row.items():
            if k != "original":
                lines.append(f"| {shape} | {k} | {v['wall']:.2f}x / {v['cpu']:.2f}x | {v['peak']:.2f}x "
                             f"({v['peak_mib']:.1f} MiB) | {v['saved']:.2f}x ({v['saved_mib']:.1f} MiB) |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 11)
    print(markdown(res))
    print(json.dumps(res, indent=1), file=sys.stderr)
