"""Smoke test of ``python -m bench`` (tiny shapes) and the fused DiverseBranchBlock forward.

* the benchmark functions run and return the documented structure (keys, positive times);
* DyRep's per-step bookkeeping issues no host synchronization and no collective (a real assertion,
  with a negative control showing the counter does see ``.item()`` / ``all_reduce``);
* the fused train-mode forward of ``DiverseBranchBlock`` equals the per-branch forward (and the
  "stack then sum" baseline of the benchmark) in float64: outputs, input and parameter gradients,
  BN running statistics and ``num_batches_tracked``, over several steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bench import adjust, data_path, dbb_block, dyrep_overhead, schedule
from bench.common import LiveTensorMemory, single_process_group
from bench.report import ROW_BUILDERS, markdown_table
from bench.sync_counter import SyncCounter
from dyrep_ray.rep.dbb import DiverseBranchBlock
from dyrep_ray.rep.geometry import BRANCH_NAMES, allowed_branches
from dyrep_ray.rep.grow_cut import grow_conv


# ---------------------------------------------------------------------------------------------------------------
# benchmark functions on tiny shapes
# ---------------------------------------------------------------------------------------------------------------
def test_sync_counter_sees_syncs_and_collectives():
    """Negative control: the counter the DyRep assertion relies on does count what it should."""
    x = torch.randn(4)
    with single_process_group():
        with SyncCounter() as counter:
            y = (x * 2).sum()
            y.item()
            bool(y > 0)
            x.tolist()
            dist.all_reduce(x)
        assert counter.syncs >= 3 and counter.collectives == 1
    with SyncCounter() as quiet:
        (x * 2).sum()
    assert quiet.syncs == 0 and quiet.collectives == 0


def test_dyrep_bookkeeping_has_no_sync_and_no_collective():
    r = dyrep_overhead.run(torch.device("cpu"), batch=2, reps=2, model_name="small_cnn")
    assert r["eligible_convs"] == 5
    assert r["step_s_off"] > 0 and r["step_s_on"] > 0 and r["ratio_on_off"] > 0 and r["record_metrics_s"] > 0
    assert r["syncs_per_step"] == 0, r["details_last_step"]
    assert r["collectives_per_step"] == 0, r["details_last_step"]
    assert r["decision_time_collectives"] == 1  # the one all-reduce at an adjust point
    assert r["met"] is True


def test_dbb_block_benchmark_structure():
    r = dbb_block.run(torch.device("cpu"), batch=2, reps=1, shapes=(("tiny", 8, 6),))
    e = r["shapes"]["tiny b2"]
    for key in ("time_s", "cpu_time_s", "peak_bytes", "saved_bytes"):
        assert set(e[key]) == {"conv_bn", "dbb_original", "dbb_fused", "convs_only"}
        assert all(v > 0 for v in e[key].values())
    for key in ("fused_over_original_time", "fused_over_original_peak_mem", "fused_over_original_saved_mem",
                "convs_only_over_original_time", "fused_over_conv_time"):
        assert e[key] > 0
    # deterministic: the fused block never holds more live memory, nor saves more, than the original
    assert e["peak_bytes"]["dbb_fused"] < e["peak_bytes"]["dbb_original"]
    assert e["saved_bytes"]["dbb_fused"] <= 0.6 * e["saved_bytes"]["dbb_original"]
    assert {"met", "met_time", "met_mem"} <= r.keys()
    rows = ROW_BUILDERS["dbb_block"](r)
    assert len(rows) == 3 and all("faithful original" in row[1] for row in rows)


def test_dbb_before_after_runs_a_previous_module_next_to_the_current_one():
    from bench import dbb_before_after
    from dyrep_ray.rep import dbb_fused

    r = dbb_before_after.run(dbb_fused.__file__, reps=1, batches=(2,), shapes=(("tiny", 8, 6),))
    row = r["tiny b2"]
    assert set(row) == {"original", "before", "after", "convs_only"}
    assert row["before"]["saved"] == row["after"]["saved"] < 0.6  # the same module loaded twice
    assert "| tiny b2 | after |" in dbb_before_after.markdown(r)


def test_live_tensor_memory_counts_a_stack():
    x = torch.randn(4, 8)
    with LiveTensorMemory() as tracker:
        ys = [x * i for i in range(3)]  # 3 x 128 B
        s = torch.stack(ys)  # + 384 B
        del ys, s
    assert tracker.peak == 6 * x.numel() * 4 and tracker.current == 0


def test_schedule_and_deploy_pieces():
    gen = torch.Generator().manual_seed(0)
    images, targets = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 10, (2,), generator=gen)
    stages = schedule.build_schedule(images, targets, grows=2, cut_blocks=1, cut_per_block=2, steps_per_stage=1)
    assert [n for n, _ in stages] == ["plain", "grow1", "grow2", "grow4+cut"]
    blocks = [schedule.describe(m)["blocks"] for _, m in stages]
    assert blocks == [0, 1, 2, 2]
    assert schedule.describe(stages[-1][1])["branches"] < schedule.describe(stages[-2][1])["branches"]
    d = schedule.deploy_latency(stages[-1][1], stages[0][1], torch.device("cpu"), batch=2, reps=1)
    assert d["params_equal"] and d["no_blocks_left"] and d["latency_ratio"] > 0
    assert d["max_abs_output_diff"] <= 1e-4 * max(1.0, d["max_abs_output"])


def test_adjust_benchmark_tiny():
    r = adjust.run(torch.device("cpu"), batch=4, reps=1, model="small_cnn", recal_iters=2)
    assert [e["op"] for e in r["events"]] == ["grow"]
    assert r["adjust_s"] > 0 and r["step_s_before"] > 0 and r["adjust_in_steps"] > 0 and r["ddp_rewrap_s"] > 0
    assert not dist.is_initialized()  # the benchmark's process group is gone


def test_tiny_cifar_dir_and_loader_rate(tmp_path):
    from torch.utils.data import DataLoader

    from dyrep_ray.data import build_datasets

    root = data_path.write_tiny_cifar10(tmp_path, per_batch=8, test=4)
    train, val, classes = build_datasets("cifar10", root)
    assert (len(train), len(val), classes) == (40, 4, 10)
    rate = data_path._loader_rate(DataLoader(train, batch_size=16))
    assert rate["images"] == 40 and rate["images_per_s"] > 0


def test_report_rows_render():
    fake = {"model": "m", "batch": 2, "ratio_on_off": 1.0, "cpu_ratio_on_off": 1.0, "step_s_off": 0.1,
            "record_metrics_s": 0.001, "syncs_per_step": 0, "collectives_per_step": 0, "decision_time_syncs": 2,
            "decision_time_collectives": 1, "met": True}
    table = markdown_table(ROW_BUILDERS["dyrep_overhead"](fake))
    assert table.count("\n") == 3 and "| met |" in table


# ---------------------------------------------------------------------------------------------------------------
# fused DiverseBranchBlock forward == per-branch forward (train mode, float64)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1.0)
            m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            m.eps = float(torch.rand((), generator=gen, dtype=torch.float64)) * 1e-3 + 1e-5
            m.momentum = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.3 + 0.05


def _stack_sum(block, x):
    return dbb_block.stacked_forward(block, x)


def assert_same_training(fused: nn.Module, reference: nn.Module, forward_ref, x_shape, steps: int = 2,
                         seed: int = 0) -> None:
    """Run ``steps`` train-mode forward/backward passes on both; compare everything."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), forward_ref(xb)
        g = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        scale = float(yb.detach().abs().max())
        assert float((ya - yb).detach().abs().max()) <= 1e-12 * scale
        assert float((xa.grad - xb.grad).abs().max()) <= 1e-12 * max(1.0, float(xb.grad.abs().max()))
    pa, pb = dict(fused.named_parameters()), dict(reference.named_parameters())
    assert list(pa) == list(pb)
    for name in pa:
        ga, gb = pa[name].grad, pb[name].grad
        assert ga is not None and gb is not None, name
        assert float((ga - gb).abs().max()) <= 1e-11 * max(1.0, float(gb.abs().max())), name
    sa, sb = fused.state_dict(), reference.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        if sa[name].dtype == torch.int64:  # num_batches_tracked
            assert torch.equal(sa[name], sb[name]), name
        else:
            assert float((sa[name] - sb[name]).abs().max()) <= 1e-12 * max(1.0, float(sb[name].abs().max())), name


CONFIGS = [  # c_in, c_out, k, stride, padding, branch subset (None = all allowed)
    (4, 4, 3, 1, 1, None), (4, 4, 3, 2, 1, None), (4, 6, 3, 1, 1, None), (4, 4, 5, 1, 2, None),
    (4, 4, 3, 1, 0, None), (4, 4, 3, 1, 2, None), (4, 4, 5, 2, 3, None), (3, 5, 3, 2, 0, None),
    (4, 4, 3, 1, 1, ["kxk", "1x1_avg", "identity"]), (4, 4, 3, 1, 1, ["1x1", "kxk"]),
    (4, 4, 3, 1, 1, ["1x1_kxk", "kxk", "kx1"]), (4, 4, 3, 1, 1, ["kxk"]),
]


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,branches", CONFIGS)
def test_fused_forward_equals_branch_forward_train_mode(c_in, c_out, k, stride, padding, branches):
    block = DiverseBranchBlock(c_in, c_out, k, stride, padding, branches=branches, dtype=torch.float64)
    expected = set(branches) if branches else set(allowed_branches(c_in, c_out, k, stride, padding))
    assert set(block.branch_names) == expected
    randomize(block, seed=k * 100 + stride * 10 + padding)
    block.train()
    assert block._fusable()  # the module forward below really is the fused path
    reference = copy.deepcopy(block)
    assert_same_training(block, reference, reference._forward_branches, (3, c_in, 9, 8))
    # and the benchmark's "stack then sum" baseline computes the same function
    baseline = copy.deepcopy(block)
    stacked_copy = copy.deepcopy(block)
    assert_same_training(stacked_copy, baseline, lambda x: _stack_sum(baseline, x), (2, c_in, 7, 7), steps=1)


def test_fused_forward_nested_block_and_grown_conv():
    inner = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    outer = DiverseBranchBlock(4, 4, 3, 1, 1, kxk_conv=inner, dtype=torch.float64)
    randomize(outer, seed=3)
    outer.train()
    assert outer._fusable() and inner._fusable()
    ref = copy.deepcopy(outer)
    ref_inner = ref.kxk_branch.conv

    def branches_everywhere(x):  # reference: both levels per branch
        ref_inner.forward = ref_inner._forward_branches
        return ref._forward_branches(x)

    assert_same_training(outer, ref, branches_everywhere, (2, 4, 6, 6))
    model = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=True, dtype=torch.float64))
    block = grow_conv(model, "0", seed=1)
    randomize(block, seed=4)
    block.train()
    ref = copy.deepcopy(block)
    assert_same_training(block, ref, ref._forward_branches, (2, 4, 5, 5))


def test_fused_forward_mixed_bn_modes_and_eval():
    """BN recalibration runs the model in eval mode with only some BNs training (per-BN flags)."""
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=5)
    block.eval()
    for name in ("1x1_kxk", "identity"):
        for m in block.branches[name].modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.momentum = None  # cumulative average, as recalibrate_bn does
    ref = copy.deepcopy(block)
    assert_same_training(block, ref, ref._forward_branches, (3, 4, 6, 7), steps=3)
    block.eval()
    ref.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert float((block(x) - ref._forward_branches(x)).abs().max()) <= 1e-12 * float(ref(x).abs().max())


def test_unfusable_blocks_take_the_branch_path():
    grouped = DiverseBranchBlock(4, 4, 3, 1, 1, groups=2, dtype=torch.float64)
    assert not grouped._fusable()
    randomize(grouped, seed=6)
    grouped.train()
    ref = copy.deepcopy(grouped)
    assert_same_training(grouped, ref, ref._forward_branches, (2, 4, 5, 5), steps=1)
    hooked = DiverseBranchBlock(4, 4, 3, 1, 1)
    seen = []
    hooked.branches["1x1"].conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not hooked._fusable()
    hooked(torch.randn(1, 4, 5, 5))
    assert seen == [torch.Size([1, 4, 5, 5])]  # hooks on branch modules keep firing


def test_block_branch_names_and_state_dict_keys_unchanged():
    block = DiverseBranchBlock(4, 4, 3, 1, 1)
    assert block.branch_names == list(BRANCH_NAMES)
    keys = list(block.state_dict())
    assert "branches.1x1_kxk.bn1.bn.running_mean" in keys and "branches.kxk.conv.weight" in keys
    assert len([k for k in keys if k.endswith("num_batches_tracked")]) == 9


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 2), (5, 2, 4), (3, 1, 0)])
def test_avg_pool_paths_agree(k, stride, pad):
    """The CPU box-filter path and the avg_pool2d path (used on accelerators / under autocast)."""
    from dyrep_ray.rep.dbb_pad import avg_pool_zero_padded

    gen = torch.Generator().manual_seed(k + pad)
    z = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    ref = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(z, [pad] * 4), k, stride, 0)
    ya = avg_pool_zero_padded(za, k, stride, pad, box_filter=True)
    yb = avg_pool_zero_padded(zb, k, stride, pad, box_filter=False)
    assert float((ya - ref).detach().abs().max()) <= 1e-14 and float((yb - ref).detach().abs().max()) <= 1e-14
    g = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
    ya.backward(g)
    yb.backward(g)
    assert float((za.grad - zb.grad).abs().max()) <= 1e-14


def test_fused_forward_channels_last_and_autocast():
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=7)
    block.train()
    ref = copy.deepcopy(block)
    assert_same_training(block, ref, lambda x: ref._forward_branches(x.contiguous(memory_format=torch.channels_last)),
                         (2, 4, 6, 6), steps=1)
    block32 = DiverseBranchBlock(4, 4, 3, 1, 1)
    ref32 = copy.deepcopy(block32)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = block32(x).detach(), ref32._forward_branches(x).detach()
    assert ya.dtype == yb.dtype
    assert float((ya.float() - yb.float()).abs().max()) <= 5e-2 * float(yb.float().abs().max())
