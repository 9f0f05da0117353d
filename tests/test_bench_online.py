"""Smoke test of benchmark 8 (bench/online_block.py) on tiny shapes: structure, the same convs grown in both
block types, and the deterministic memory facts (live-tensor tracker on the CPU)."""

from __future__ import annotations

import torch

from bench import online_block
from bench.report import markdown_table
from dyrep_ray.models import build_model
from dyrep_ray.rep.dbb import DiverseBranchBlock
from dyrep_ray.rep.online import OnlineBlock


def test_grown_paths_are_spread_and_deterministic():
    model = build_model("resnet18", 10)
    paths = online_block.grown_paths(model, 4)
    assert paths == online_block.grown_paths(build_model("resnet18", 10), 4)
    assert len(set(paths)) == 4 and paths[0].startswith("layer1") and paths[-1].startswith("layer4")
    assert "conv1" not in paths


def test_variants_grow_the_same_convs_and_keep_the_function():
    variants, paths = online_block.build_variants("resnet18", torch.device("cpu"), count=2)
    online, bn, plain = variants["online"], variants["bn"], variants["plain"]
    assert [p for p, m in online.named_modules() if isinstance(m, OnlineBlock)] == paths
    assert [p for p, m in bn.named_modules() if isinstance(m, DiverseBranchBlock)] == paths
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for m in variants.values():
        m.eval()
    with torch.no_grad():
        ref = plain(x)
        assert float((online(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_online_block_benchmark_tiny():
    r = online_block.run(torch.device("cpu"), batch=2, reps=1, models=("resnet18",),
                         block_shapes=(("tiny", 8, 6),), count=2)
    e = r["models"]["resnet18"]
    assert e["blocks"] == {"plain": 0, "online": 2, "bn": 2}
    for key in ("step_s", "time_over_plain", "peak_bytes", "saved_bytes", "peak_over_plain"):
        assert set(e[key]) == set(online_block.VARIANTS) and all(v > 0 for v in e[key].values())
    # deterministic: without per-branch BN activations the online model holds less than the bn one at its peak;
    # saved for backward, the bn block's recomputed 1x1 branches keep nothing of their own (rep/dbb_recompute.py),
    # so both grown models save more than plain but their order is no longer fixed
    assert e["peak_bytes"]["online"] < e["peak_bytes"]["bn"]
    assert e["saved_bytes"]["plain"] < min(e["saved_bytes"]["online"], e["saved_bytes"]["bn"])
    b = r["block"]["tiny"]
    assert b["peak_bytes"]["online"] < b["peak_bytes"]["bn"] and b["time_over_plain"]["online"] > 0
    assert {"met", "met_time", "met_mem", "goal_time", "goal_mem"} <= r.keys()
    table = markdown_table(online_block.table_rows(r))
    assert table.count("\n") == 1 + 2 + 1 and "online" in table


def test_saved_activation_bytes_excludes_parameters():
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    # linear saves its input and its weight for backward: only the input is activation memory
    assert online_block.saved_activation_bytes(layer, lambda: layer(x)) == x.numel() * x.element_size()
    frozen = torch.nn.Linear(8, 4, bias=False)
    assert online_block.saved_activation_bytes(frozen, lambda: layer(x)) == (x.numel() + layer.weight.numel()) * 4


def test_demo_overhead_benchmark_tiny():
    from bench import demo_overhead

    tiny = ["epochs=2", "synthetic_train_size=64", "synthetic_val_size=32", "batch_size=32",
            "dyrep_recal_bn_iters=1"]
    r = demo_overhead.run(1, tiny)
    assert len(r["wall_ratios"]) == 1 and r["wall_ratio"] > 0 and r["cpu_ratio"] > 0
    assert r["grows"] >= 1  # the online variant really grew blocks
