"""DyRep controller: grow, cut, metrics, plan determinism, structure graph, BN recalibration.

Expected values are computed in the tests (hand rules of DESIGN §3, explicit formulas
on captured gradients, functional BN statistics), never copied from the implementation.
"""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dyrep_ray.rep import (
    BRANCH_NAMES,
    DiverseBranchBlock,
    DyRep,
    Plan,
    apply_plan,
    eligible_convs,
    recalibrate_bn,
    restore_graph,
    structure_graph,
)
from dyrep_ray.rep.grow_cut import grow_conv
from tests.helpers import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


ELIGIBLE = ["0", "3", "6", "9"]


@torch.no_grad()
def randomize_bns(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
            m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1.0)
            m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)


def make_net(dtype=torch.float64, seed=0) -> nn.Sequential:
    """Eligible convs: 0 (3x3), 3 (3x3 with bias), 6 (5x5 stride 2), 9 (3x3 depthwise); 12 is 1x1."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 5, 2, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).to(dtype)
    randomize_bns(net, seed + 1)
    return net


def batch(seed: int, dtype=torch.float64, n=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 12, 12, generator=gen, dtype=dtype),
            torch.randint(0, 5, (n,), generator=gen))


@torch.no_grad()
def eval_out(model, x):
    model.eval()
    return model(x)


def randomizing_recal(seed: int, calls: list | None = None):
    """A recal_fn emulating BN recalibration by writing random running stats into the given BNs."""

    def fn(model, bns):
        if calls is not None:
            calls.append(list(bns))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for bn in bns:
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) * 3 + 0.1)

    return fn


def non_kxk_bns(block: DiverseBranchBlock) -> list[nn.BatchNorm2d]:
    return [m for n, b in block.branches.items() if n != "kxk" for m in b.modules() if isinstance(m, nn.BatchNorm2d)]


# ---------------------------------------------------------------------------
# Grow
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("recal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ELIGIBLE)
def test_grow_is_function_preserving(path, dtype, recal):
    model = make_net(dtype)
    x, _ = batch(1, dtype)
    before = eval_out(model, x)
    conv = model.get_submodule(path)
    orig = copy.deepcopy(conv)
    weight_param = conv.weight
    calls: list = []
    block = grow_conv(model, path, seed=11, init_gamma=0.01,
                      recal_fn=randomizing_recal(5, calls) if recal else None)
    assert model.get_submodule(path) is block and isinstance(block, DiverseBranchBlock)
    after = eval_out(model, x)
    err = rel_err(after, before)
    assert err <= TOL[dtype], f"model output changed by grow: {err:.3g}"
    # Block-level: block(z) == original conv(z) on a random input of the conv's geometry.
    z = torch.randn(2, orig.in_channels, 9, 9, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(block(z), orig(z)) <= TOL[dtype]
    # The kxk branch reuses the user's weight Parameter object.
    assert block.kxk_branch.conv.weight is weight_param
    # New branches: last BN gamma == init_gamma, beta == 0; inner BNs gamma 1.
    for name, br in block.branches.items():
        if name == "kxk":
            continue
        assert torch.all(br.bn.weight == torch.tensor(0.01, dtype=dtype)), name
        assert torch.all(br.bn.bias == 0), name
        for m in br.modules():
            if isinstance(m, nn.BatchNorm2d) and m is not br.bn:
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    # kxk BN reset: gamma=1, fresh stats.
    kbn = block.kxk_branch.bn
    assert torch.all(kbn.weight == 1)
    assert torch.all(kbn.running_mean == 0) and torch.all(kbn.running_var == 1)
    if recal:
        assert len(calls) == 1
        assert {id(b) for b in calls[0]} == {id(b) for b in non_kxk_bns(block)}
        assert kbn not in calls[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grow_fold_leaves_no_sqrt_eps_residue(dtype):
    """A kxk BN with a large eps makes a forgotten 1/sqrt(1+eps) factor obvious in the output."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=False, dtype=dtype))
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    before = eval_out(model, x)
    block = grow_conv(model, "0", seed=0)
    after = eval_out(model, x)
    assert rel_err(after, before) <= TOL[dtype]
    # The eval-mode kxk branch alone (BN with mean 0/var 1/gamma 1) must equal conv(x; W_kxk/sqrt(1+eps)).
    kb = block.kxk_branch
    with torch.no_grad():
        kxk_out = kb(x)
        ref = F.conv2d(x, kb.conv.weight, None, 1, 1) / math.sqrt(1 + kb.bn.eps) + kb.bn.bias.reshape(1, -1, 1, 1)
    assert rel_err(kxk_out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grow_resets_kxk_bn_even_if_recal_touches_it(dtype):
    """A recal_fn that recalibrates every BN it can reach (kxk BN included) must not break the fold."""
    model = make_net(dtype)
    orig = copy.deepcopy(model[3])

    def sloppy_recal(m, bns):
        block = m[3]
        randomizing_recal(8)(m, [b for b in block.modules() if isinstance(b, nn.BatchNorm2d)])
        with torch.no_grad():
            block.kxk_branch.bn.weight.mul_(3.0)

    block = grow_conv(model, "3", seed=4, recal_fn=sloppy_recal)
    kbn = block.kxk_branch.bn
    assert torch.all(kbn.weight == 1)
    assert torch.all(kbn.running_mean == 0) and torch.all(kbn.running_var == 1)
    z = torch.randn(2, 8, 7, 7, dtype=dtype, generator=torch.Generator().manual_seed(1))
    block.eval()
    with torch.no_grad():
        assert rel_err(block(z), orig(z)) <= TOL[dtype]


def test_grow_via_controller_and_eligibility_refresh():
    model = make_net()
    x, _ = batch(2)
    before = eval_out(model, x)
    d = DyRep(model)
    assert d.eligible_names == ELIGIBLE
    block = d.grow("6", recal_fn=randomizing_recal(1))
    assert isinstance(block, DiverseBranchBlock) and model[6] is block
    assert rel_err(eval_out(model, x), before) <= 1e-10
    assert "6" not in d.eligible_names and "6.branches.kxk.conv" in d.eligible_names
    assert d.adjust_count == 1


def test_grow_rejects_non_growable_modules():
    model = make_net()
    for path in ("12", "1", "15"):  # 1x1 conv, BN, Linear
        with pytest.raises(ValueError):
            grow_conv(model, path, seed=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nested_growth_is_function_preserving(dtype):
    model = make_net(dtype)
    x, _ = batch(3, dtype)
    before = eval_out(model, x)
    w = model[3].weight
    grow_conv(model, "3", seed=1, recal_fn=randomizing_recal(2))
    assert "3.branches.kxk.conv" in dict(eligible_convs(model))
    inner = grow_conv(model, "3.branches.kxk.conv", seed=2, recal_fn=randomizing_recal(3))
    assert isinstance(model[3].kxk_branch.conv, DiverseBranchBlock) and model[3].kxk_branch.conv is inner
    assert inner.kxk_branch.conv.weight is w  # still the user's Parameter, two levels down
    err = rel_err(eval_out(model, x), before)
    assert err <= TOL[dtype], err
    # the outer block still folds exactly with a nested block in its kxk slot
    with torch.no_grad():
        k, b = model[3].equivalent_kernel()
        z = torch.randn(2, 8, 7, 7, dtype=dtype)
        assert rel_err(F.conv2d(z, k, b, 1, 1), model[3](z)) <= TOL[dtype]


def test_depth_limit_and_growth_candidates():
    """The original's rule: any square k>1 conv whose path passes through fewer than max_depth blocks."""
    model = make_net()
    grow_conv(model, "0", seed=1)
    names2 = [n for n, _ in eligible_convs(model, max_depth=2)]
    names1 = [n for n, _ in eligible_convs(model, max_depth=1)]
    assert names2 == ["0.branches.1x1_kxk.conv2", "0.branches.kxk.conv", "3", "6", "9"]
    assert set(names1) == {"3", "6", "9"}
    grow_conv(model, "0.branches.kxk.conv", seed=2)
    deep = "0.branches.kxk.conv.branches.kxk.conv"
    deep_1x1_kxk = "0.branches.kxk.conv.branches.1x1_kxk.conv2"
    assert isinstance(model.get_submodule(deep), nn.Conv2d)
    names2 = [n for n, _ in eligible_convs(model, max_depth=2)]
    assert deep not in names2 and deep_1x1_kxk not in names2  # depth 2: not eligible
    assert {deep, deep_1x1_kxk} <= {n for n, _ in eligible_convs(model, max_depth=3)}  # the limit is the parameter
    assert DyRep(model, max_depth=2).eligible_names == ["0.branches.1x1_kxk.conv2", "3", "6", "9"]
    # 1xk / kx1 / 1x1 convs are never square k>1, so never candidates
    assert not any(n.endswith(("1xk.conv", "kx1.conv", "1x1.conv", "conv1"))
                   for n, _ in eligible_convs(model, max_depth=10))
    assert eligible_convs(model, exclude=["0", "3", "6"]) == [("9", model[9])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grow_in_1x1_kxk_slot_is_exact_reduced_and_deploys(dtype):
    from dyrep_ray.rep import deploy

    model = make_net(dtype)
    x, _ = batch(8, dtype)
    before = eval_out(model, x)
    d = DyRep(model)
    d.grow("3", recal_fn=randomizing_recal(1))
    slot = "3.branches.1x1_kxk.conv2"
    assert slot in d.eligible_names
    inner = d.grow(slot, recal_fn=randomizing_recal(2))
    assert isinstance(inner, DiverseBranchBlock) and inner.padding == 0
    assert inner.branch_names == ["1x1_kxk", "1x1_avg", "kxk"]  # padding 0 != k//2: the reduced set
    randomize_bns(model, 31)
    before = eval_out(model, x)
    with torch.no_grad():  # the outer block still folds exactly with a block in its 1x1_kxk slot
        k, b = model[3].equivalent_kernel()
        z = torch.randn(2, 8, 7, 7, dtype=dtype)
        assert rel_err(F.conv2d(z, k, b, 1, 1), model[3].eval()(z)) <= TOL[dtype]
    assert rel_err(eval_out(deploy(model), x), before) <= TOL[dtype]
    graph = json.loads(json.dumps(structure_graph(model)))
    assert slot in [entry["path"] for entry in graph["blocks"]]
    rebuilt = restore_graph(make_net(dtype, seed=9), graph)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rel_err(eval_out(rebuilt, x), before) <= TOL[dtype]
    # and it can be cut (both mechanics) with the function kept
    for mode in ("reset", "absorb"):
        m = copy.deepcopy(model)
        DyRep(m, cut_mode=mode).cut(slot, ["1x1_avg"])
        assert rel_err(eval_out(m, x), before) <= TOL[dtype], mode
        DyRep(m, cut_mode=mode).cut("3", ["1x1_kxk"])  # removes the branch holding the nested block
        assert rel_err(eval_out(m, x), before) <= TOL[dtype], mode


@pytest.mark.parametrize("k", [2, 4])
def test_every_eligible_conv_grows_function_preserving_even_kernels(k):
    model = nn.Sequential(nn.Conv2d(4, 4, k, 1, k // 2, bias=False, dtype=torch.float64))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    before = eval_out(model, x)
    if "0" not in [n for n, _ in eligible_convs(model)]:
        return  # not eligible: fine
    grow_conv(model, "0", seed=0)
    assert rel_err(eval_out(model, x), before) <= 1e-10


# ---------------------------------------------------------------------------
# Cut
# ---------------------------------------------------------------------------
KXK_GAMMA = torch.tensor([1.0, -3.0, 2.0, -2.0, 3.0, -1.0, 2.0, 2.0])  # mean |gamma| = 2


@torch.no_grad()
def set_importance(block: DiverseBranchBlock, importance: dict[str, float]) -> None:
    """Set BN gammas so that mean|g_branch| / mean|g_kxk| == importance[branch] (alternating signs)."""
    c = block.out_channels
    kxk = KXK_GAMMA[:c].to(block.kxk_branch.bn.weight.dtype)
    block.kxk_branch.bn.weight.copy_(kxk)
    ref = float(kxk.abs().mean())
    signs = torch.tensor([(-1.0) ** i for i in range(c)], dtype=kxk.dtype)
    for name, value in importance.items():
        block.branches[name].bn.weight.copy_(signs * value * ref)


def hand_cut_rule(importance: dict[str, float], lam=0.1, gate=0.02) -> set[str]:
    vals = list(importance.values())
    std_sample, std_pop = statistics.stdev(vals), statistics.pstdev(vals)
    # the test data is chosen so both definitions of std agree on the gate
    assert (std_sample > gate) == (std_pop > gate)
    if std_pop <= gate:
        return set()
    mean = statistics.mean(vals)
    return {n for n, v in importance.items() if v < mean and v < lam}


def grown_net(paths=("3",)):
    model = make_net()
    for i, p in enumerate(paths):
        grow_conv(model, p, seed=i, recal_fn=randomizing_recal(i + 10))
    return model


def test_cut_rule_known_answer_and_function_preserved():
    model = grown_net()
    imp = {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15, "identity": 0.02}
    set_importance(model[3], imp)
    measured = {n: float(v) for n, v in model[3].branch_importance().items()}
    assert measured == pytest.approx({**imp, "kxk": 1.0})
    expected = hand_cut_rule(imp)
    assert expected == {"1x1", "1x1_avg", "identity"}  # kx1 (0.15) is below the mean but not below lambda
    x, _ = batch(4)
    before = eval_out(model, x)
    d = DyRep(model, grow_topk=0)
    plan = d.plan()
    assert [c.path for c in plan.cut] == ["3"]
    assert set(plan.cut[0].branches) == expected and plan.cut[0].collapses is False
    d.apply(plan)
    assert set(model[3].branch_names) == set(BRANCH_NAMES) - expected
    assert rel_err(eval_out(model, x), before) <= 1e-10


@pytest.mark.parametrize("imp", [
    # all below lambda, some below the mean, but std (~0.0019) <= gate: no cut
    {"1x1": 0.05, "1x1_kxk": 0.051, "1x1_avg": 0.052, "1xk": 0.053, "kx1": 0.054, "identity": 0.055},
    # std above the gate, some below the mean, but none below lambda: no cut
    {"1x1": 0.2, "1x1_kxk": 0.3, "1x1_avg": 0.9, "1xk": 1.0, "kx1": 1.1, "identity": 0.25},
])
def test_cut_rule_no_cut_cases(imp):
    model = grown_net()
    set_importance(model[3], imp)
    assert hand_cut_rule(imp) == set()
    plan = DyRep(model, grow_topk=0).plan()
    assert plan.cut == ()


def test_cut_rule_custom_threshold_and_gate():
    model = grown_net()
    imp = {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15, "identity": 0.02}
    set_importance(model[3], imp)
    expected = hand_cut_rule(imp, lam=0.2)
    assert expected == {"1x1", "1x1_avg", "identity", "kx1"}
    plan = DyRep(model, grow_topk=0, cut_threshold=0.2).plan()
    assert set(plan.cut[0].branches) == expected
    assert DyRep(model, grow_topk=0, cut_std_gate=1.0).plan().cut == ()  # std ~0.26 < 1.0


@pytest.mark.parametrize("path", ["0", "3"])
def test_collapse_to_conv_with_bias_eligible_again_and_output_unchanged(path):
    model = grown_net(paths=(path,))
    x, _ = batch(5)
    before = eval_out(model, x)
    d = DyRep(model)
    block = model.get_submodule(path)
    result = d.cut(path, [n for n in block.branch_names if n != "kxk"])
    assert type(result) is nn.Conv2d and model.get_submodule(path) is result
    assert result.bias is not None
    assert result.dyrep_orig_bias is (path == "3")  # conv 3 had a bias originally, conv 0 not
    assert path in d.eligible_names
    assert rel_err(eval_out(model, x), before) <= 1e-10
    # ...and it can grow again, still preserving the function (bias carried into the block)
    again = d.grow(path, recal_fn=randomizing_recal(7))
    assert isinstance(again, DiverseBranchBlock) and again.kxk_branch.conv.bias is None
    assert rel_err(eval_out(model, x), before) <= 1e-10


def test_lone_weak_branch_is_kept_by_default_and_cut_with_the_option():
    """The original never collapses a block: one valid weight has no std, so nothing is cut."""
    model = grown_net(paths=("3",))
    DyRep(model).cut("3", ["1x1_kxk", "1x1_avg", "1xk", "kx1", "identity"])
    assert model[3].branch_names == ["1x1", "kxk"]
    set_importance(model[3], {"1x1": 0.05})
    assert DyRep(model, grow_topk=0).plan().cut == ()
    x, _ = batch(6)
    before = eval_out(model, x)
    d = DyRep(model, grow_topk=0, cut_lone_branch=True)
    plan = d.plan()
    assert [(c.path, c.branches, c.collapses) for c in plan.cut] == [("3", ("1x1",), True)]
    assert plan.cut[0].importance == pytest.approx({"1x1": 0.05, "kxk": 1.0})
    d.apply(plan)
    assert type(model[3]) is nn.Conv2d and model[3].bias is not None
    assert rel_err(eval_out(model, x), before) <= 1e-10
    assert "3" in d.eligible_names


def test_two_weights_largest_survives_and_weights_of_exactly_one_are_ignored():
    model = grown_net(paths=("3",))
    DyRep(model).cut("3", ["1x1_avg", "1xk", "kx1", "identity"])
    set_importance(model[3], {"1x1": 0.01, "1x1_kxk": 0.09})  # std 0.057 > gate, 0.01 < mean and < lambda
    assert [c.branches for c in DyRep(model, grow_topk=0).plan().cut] == [("1x1",)]
    set_importance(model[3], {"1x1": 0.01, "1x1_kxk": 1.0})  # 1.0 is not a valid weight: one left, no cut
    assert DyRep(model, grow_topk=0).plan().cut == ()


@pytest.mark.parametrize("mode", ["reset", "absorb"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_planned_cut_preserves_function_in_both_modes(mode, dtype):
    model = make_net(dtype)
    grow_conv(model, "3", seed=0, recal_fn=randomizing_recal(10))
    grow_conv(model, "3.branches.kxk.conv", seed=1, recal_fn=randomizing_recal(11))
    set_importance(model[3], {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15,
                              "identity": 0.02})
    randomize_bns(model[3].kxk_branch.conv, 12)
    x, _ = batch(9, dtype)
    before = eval_out(model, x)
    d = DyRep(model, grow_topk=0, cut_mode=mode)
    plan = d.plan()
    assert plan.cut_mode == mode and [c.path for c in plan.cut] == ["3"]
    d.apply(json.loads(json.dumps(plan.to_json())))
    assert set(model[3].branch_names) == {"1x1_kxk", "1xk", "kx1", "kxk"}
    assert rel_err(eval_out(model, x), before) <= TOL[dtype]
    kxk_bn = model[3].kxk_branch.bn
    assert torch.equal(kxk_bn.weight, torch.ones_like(kxk_bn.weight)) is (mode == "reset")


def test_grow_first_then_cut_and_a_just_grown_block_is_not_cut():
    model = grown_net(paths=("3",))
    d = DyRep(model, grow_topk=3, exclude=["3"])
    train_steps(model, d, 1, seed=90)
    set_importance(model[3], {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15,
                              "identity": 0.02})
    plan = d.plan()
    grown = {g.path for g in plan.grow}
    assert grown == {"0", "6", "9"}  # blocks grown at this adjust ...
    assert [c.path for c in plan.cut] == ["3"]  # ... are not cut at once; the old block is
    events = d.apply(plan)
    ops = [e.op for e in events]
    assert ops == ["grow"] * len(plan.grow) + ["cut"]
    # what the original evaluates after growing: every just-grown block has equal weights -> no cut
    assert [c.path for c in DyRep(model, grow_topk=0).plan().cut] == []


def test_plan_with_outer_collapse_and_nested_cut_applies():
    model = grown_net(paths=("3",))
    grow_conv(model, "3.branches.kxk.conv", seed=5, recal_fn=randomizing_recal(6))
    d = DyRep(model, grow_topk=0, cut_lone_branch=True)
    d.cut("3", ["1x1_kxk", "1x1_avg", "1xk", "kx1", "identity"])
    set_importance(model[3], {"1x1": 0.05})  # outer: one weak branch -> collapses (cut_lone_branch)
    inner = model[3].kxk_branch.conv
    set_importance(inner, {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15, "identity": 0.02})
    x, _ = batch(7)
    before = eval_out(model, x)
    plan = d.plan()
    assert "3" in {c.path for c in plan.cut}  # (today the nested block's cut is planned too)
    d.apply(plan)
    assert type(model[3]) is nn.Conv2d
    assert rel_err(eval_out(model, x), before) <= 1e-10


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def hand_metric(metric: str, grad: torch.Tensor, weight: torch.Tensor) -> float:
    g, w = grad.double(), weight.double()
    if metric == "synflow":
        return float((g * w).sum())
    if metric == "snip":
        return float((g * w).abs().sum())
    if metric == "grad_norm":
        return math.sqrt(float((g * g).sum()))
    raise AssertionError(metric)


def train_steps(model, ctrl, n_steps, seed, grad_scale=None, lr=0.05, hand=None):
    """SGD steps with record_metrics between backward and step.

    ``hand`` (if given) accumulates, per metric name, the per-conv hand-computed values of
    every metric (so a test can also check that the wrong formula would not match).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    convs = dict(model.named_modules())
    for t in range(n_steps):
        x, y = batch(seed + t, next(model.parameters()).dtype)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scale = 1.0 if grad_scale is None else float(grad_scale)
        (loss * scale).backward()
        if hand is not None:
            for m in ("synflow", "snip", "grad_norm"):
                per = hand.setdefault(m, {})
                for name in ctrl.eligible_names:
                    conv = convs[name]
                    per[name] = per.get(name, 0.0) + hand_metric(m, conv.weight.grad / scale, conv.weight.detach())
        ctrl.record_metrics(grad_scale=grad_scale)
        if grad_scale is not None:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad /= scale
        opt.step()


@pytest.mark.parametrize("n_steps", [2, 3])
@pytest.mark.parametrize("metric", ["synflow", "snip", "grad_norm"])
def test_metric_matches_hand_computation_averaged_over_steps(metric, n_steps):
    model = grown_net(paths=("6",))  # includes a nested-slot conv among the eligible ones
    ctrl = DyRep(model, metric=metric)
    assert ctrl.eligible_names == ["0", "3", "6.branches.1x1_kxk.conv2", "6.branches.kxk.conv", "9"]
    hand: dict[str, dict[str, float]] = {}
    train_steps(model, ctrl, n_steps, seed=100, hand=hand)
    expected = {n: v / n_steps for n, v in hand[metric].items()}
    scores = ctrl.metric_scores()
    assert set(scores) == set(expected)
    for name in expected:
        assert scores[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name
    # the check discriminates: every other formula (or a missing average) is off for some conv
    for other in ("synflow", "snip", "grad_norm"):
        if other != metric:
            assert any(scores[n] != pytest.approx(v / n_steps, rel=1e-3) for n, v in hand[other].items()), other
    assert any(scores[n] != pytest.approx(v, rel=1e-3) for n, v in hand[metric].items())  # not averaged
    if metric == "synflow":
        assert any(v < 0 for v in scores.values())  # signed: this run has negative sums
    else:
        assert all(v > 0 for v in scores.values())


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("metric", ["synflow", "snip", "grad_norm"])
def test_grad_scale_divides(metric, as_tensor):
    model = make_net()
    ref_model = copy.deepcopy(model)
    ctrl, ref_ctrl = DyRep(model, metric=metric), DyRep(ref_model, metric=metric)
    scale = torch.tensor(1024.0, dtype=torch.float64) if as_tensor else 1024.0
    hand: dict[str, dict[str, float]] = {}
    train_steps(model, ctrl, 2, seed=7, grad_scale=scale, hand=hand)
    train_steps(ref_model, ref_ctrl, 2, seed=7)
    scores, ref = ctrl.metric_scores(), ref_ctrl.metric_scores()
    for name in ref:
        assert scores[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-9)
        assert scores[name] == pytest.approx(hand[metric][name] / 2, rel=1e-5, abs=1e-9)


def test_random_metric_deterministic_and_identical_across_controllers():
    a, b = make_net(), make_net()
    da, db = DyRep(a, metric="random", seed=3), DyRep(b, metric="random", seed=3)
    sa, sb = da.metric_scores(), db.metric_scores()
    assert sa == sb and set(sa) == set(ELIGIBLE)
    assert all(0.0 <= v < 1.0 for v in sa.values())
    assert len(set(sa.values())) == len(sa)
    assert da.plan() == db.plan()
    assert DyRep(make_net(), metric="random", seed=4).metric_scores() != sa  # seed matters
    da.adjust_count = db.adjust_count = 1
    assert da.metric_scores() == db.metric_scores() != sa  # adjust index matters
    da.adjust_count = 0
    assert da.metric_scores() == sa  # and is reproducible


@pytest.mark.parametrize("metric", ["synflow", "snip", "grad_norm", "random"])
def test_record_metrics_does_no_host_sync(metric, monkeypatch):
    model = grown_net(paths=("3",))
    ctrl = DyRep(model, metric=metric)
    x, y = batch(9)
    model.train()
    F.cross_entropy(model(x), y).backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync / collective during record_metrics")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "item", forbidden)
        mp.setattr(torch.Tensor, "tolist", forbidden)
        mp.setattr(torch.Tensor, "__float__", forbidden)
        mp.setattr(torch.Tensor, "__bool__", forbidden)
        mp.setattr(torch.Tensor, "cpu", forbidden)
        mp.setattr(torch.distributed, "all_reduce", forbidden)
        mp.setattr(dist, "all_reduce", forbidden)
        ctrl.record_metrics()
        ctrl.record_metrics(grad_scale=torch.tensor(2.0))
        ctrl.record_metrics(grad_scale=4.0)
        with pytest.raises(AssertionError):  # the patches are live
            torch.ones(2).sum().item()
    # the patches are gone now
    assert ctrl.metric_scores()
    assert ctrl._steps == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_metric_means_no_growth_and_a_note(bad):
    model = make_net()
    ctrl = DyRep(model, grow_topk=2)
    x, y = batch(10)
    model.train()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model[3].weight.grad[0, 0, 0, 0] = bad
    ctrl.record_metrics()
    plan = ctrl.plan()
    assert plan.grow == ()
    assert any("non-finite" in note for note in plan.notes)
    json.dumps(plan.to_json())  # still serializable
    events = ctrl.apply(plan)
    assert all(e.op != "grow" for e in events)
    assert not any(isinstance(m, DiverseBranchBlock) for m in model.modules())


@pytest.mark.parametrize("metric", ["synflow", "snip", "grad_norm"])
def test_a_non_finite_step_adds_nothing_to_the_sums_and_needs_no_host_sync(metric, monkeypatch):
    """An fp16 overflow step (recorded under on_nonfinite: ignore) must not poison the interval's decision."""
    model = make_net()
    x, y = batch(11)
    model.train()
    F.cross_entropy(model(x), y).backward()
    clean, mixed = DyRep(model, metric=metric, grow_topk=2), DyRep(model, metric=metric, grow_topk=2)
    clean.record_metrics()
    finite_grad = model[3].weight.grad.clone()
    mixed.record_metrics()
    with torch.no_grad():
        model[3].weight.grad[0, 0, 0, 0] = float("inf")
    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__float__", "__bool__", "cpu"):
            mp.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync during record_metrics"))
        mixed.record_metrics()
    model[3].weight.grad.copy_(finite_grad)
    assert mixed.metric_scores() == clean.metric_scores()  # averaged over the one finite step
    assert all(math.isfinite(v) for v in mixed.metric_scores().values())
    plan = mixed.plan()
    assert plan.grow and plan.grow == clean.plan().grow and not plan.notes
    restored = DyRep(model, metric=metric, grow_topk=2)
    restored.load_state_dict(mixed.state_dict())  # the non-finite count survives a checkpoint
    assert restored.metric_scores() == mixed.metric_scores()


def test_metric_sums_follow_the_gradients_dtype():
    model = make_net(dtype=torch.float32)
    ctrl = DyRep(model, metric="synflow")
    assert {t.dtype for t in ctrl._sums.values()} == {torch.float32}
    model.double()  # as a framework may convert (or move) the module after the controller was built
    x, y = batch(12)
    F.cross_entropy(model(x), y).backward()
    ctrl.record_metrics()
    assert {t.dtype for t in ctrl._sums.values()} == {torch.float64}
    assert all(math.isfinite(v) for v in ctrl.metric_scores().values())


def test_topk_picks_largest_scores():
    model = make_net()
    ctrl = DyRep(model, grow_topk=2, metric="snip")
    hand: dict[str, dict[str, float]] = {}
    train_steps(model, ctrl, 2, seed=21, hand=hand)
    plan = ctrl.plan()
    expected = sorted(hand["snip"], key=lambda n: -hand["snip"][n])[:2]
    assert [g.path for g in plan.grow] == expected
    assert len({g.seed for g in plan.grow}) == 2


# ---------------------------------------------------------------------------
# Plan determinism and replicas
# ---------------------------------------------------------------------------
def deterministic_recal(model_dtype=torch.float64):
    batches = [batch(500 + i, model_dtype)[0] for i in range(3)]
    return lambda model, bns: recalibrate_bn(model, batches, bns, num_iters=3)


def assert_state_dicts_bit_identical(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_plan_determinism_json_and_bit_identical_replicas():
    a = make_net()
    b = copy.deepcopy(a)
    da, db = DyRep(a, grow_topk=2, seed=5), DyRep(b, grow_topk=2, seed=5)
    for model, ctrl in ((a, da), (b, db)):
        train_steps(model, ctrl, 3, seed=40)
    pa, pb = da.plan(), db.plan()
    assert pa == pb
    assert len(pa.grow) == 2
    wire = json.loads(json.dumps(pa.to_json()))
    assert wire == pa.to_json() and Plan.from_json(wire) == pa
    da.apply(pa, recal_fn=deterministic_recal())
    db.apply(wire, recal_fn=deterministic_recal())  # the JSON copy, as another rank would receive it
    assert_state_dicts_bit_identical(a, b)
    assert structure_graph(a) == structure_graph(b)

    # Round 2: train, force cuts identically, plan (cuts + nested grows) and apply again.
    for model, ctrl in ((a, da), (b, db)):
        train_steps(model, ctrl, 2, seed=60)
        grown = pa.grow[0].path
        set_importance(model.get_submodule(grown), {
            n: v for n, v in {"1x1": 0.05, "1x1_kxk": 0.5, "1x1_avg": 0.08, "1xk": 0.6, "kx1": 0.15,
                              "identity": 0.02}.items() if n in model.get_submodule(grown).branch_names})
    pa2, pb2 = da.plan(), db.plan()
    assert pa2 == pb2 and pa2.cut and pa2.grow
    assert Plan.from_json(json.loads(json.dumps(pa2.to_json()))) == pa2
    da.apply(pa2, recal_fn=deterministic_recal())
    db.apply(json.loads(json.dumps(pb2.to_json())), recal_fn=deterministic_recal())
    assert_state_dicts_bit_identical(a, b)
    x, _ = batch(70)
    assert torch.equal(eval_out(a, x), eval_out(b, x))


def test_apply_plan_rejects_malformed_plans():
    model = make_net()
    for bad in ({}, {"version": 99, "grow": [], "cut": []}, {"version": 1, "grow": []}, [], None):
        with pytest.raises(ValueError):
            apply_plan(model, bad)


def test_controller_state_dict_round_trip():
    model = make_net()
    ctrl = DyRep(model)
    train_steps(model, ctrl, 2, seed=3)
    state = ctrl.state_dict()
    other = DyRep(copy.deepcopy(model))
    other.load_state_dict(state)
    assert other.metric_scores() == ctrl.metric_scores()
    assert other.adjust_count == ctrl.adjust_count


# ---------------------------------------------------------------------------
# Structure graph round trip
# ---------------------------------------------------------------------------
def heavily_modified_net():
    model = make_net()
    d = DyRep(model)
    for i, p in enumerate(["0", "3", "6", "9"]):
        d.grow(p, recal_fn=randomizing_recal(i))
    d.grow("0.branches.kxk.conv", recal_fn=randomizing_recal(10))
    d.grow("3.branches.kxk.conv", recal_fn=randomizing_recal(11))
    d.cut("6", ["1x1", "kx1"])
    d.cut("9", ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity"])  # collapse top-level
    inner3 = model.get_submodule("3.branches.kxk.conv")
    d.cut("3.branches.kxk.conv", [n for n in inner3.branch_names if n != "kxk"])  # collapse nested
    d.cut("0.branches.kxk.conv", ["1x1", "1x1_avg"])
    randomize_bns(model, 77)
    return model


def test_structure_graph_round_trip():
    model = heavily_modified_net()
    graph = structure_graph(model)
    by_path = {e["path"]: e for e in graph["blocks"]}
    assert set(by_path) == {"0", "0.branches.kxk.conv", "3", "3.branches.kxk.conv", "6", "9"}
    assert by_path["9"]["type"] == "conv" and by_path["9"]["bias"] is True and by_path["9"]["orig_bias"] is False
    assert by_path["3.branches.kxk.conv"]["type"] == "conv" and by_path["3.branches.kxk.conv"]["bias"] is True
    assert by_path["3"]["orig_bias"] is True and by_path["0"]["orig_bias"] is False
    assert set(by_path["6"]["branches"]) == {"1x1_kxk", "1x1_avg", "kxk", "1xk"}
    assert set(by_path["0.branches.kxk.conv"]["branches"]) == {"1x1_kxk", "kxk", "1xk", "kx1"}

    text = json.dumps(graph)
    fresh = make_net(seed=123)  # untouched base model with other weights
    restore_graph(fresh, json.loads(text))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert structure_graph(fresh) == graph
    assert [(n, type(m)) for n, m in fresh.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    x, _ = batch(8)
    assert torch.equal(eval_out(fresh, x), eval_out(model, x))
    model.train()
    fresh.train()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_restore_graph_rejects_bad_graphs():
    graph = structure_graph(heavily_modified_net())
    with pytest.raises(ValueError):
        restore_graph(make_net(), {"version": 99, "blocks": []})
    with pytest.raises(ValueError):
        restore_graph(make_net(), {"version": graph["version"], "blocks": [{**graph["blocks"][0], "path": "42"}]})
    with pytest.raises(ValueError):  # a dbb where the model has a BatchNorm
        restore_graph(make_net(), {"version": graph["version"], "blocks": [{**graph["blocks"][0], "path": "1"}]})
    wrong = {**[e for e in graph["blocks"] if e["path"] == "3"][0], "path": "6"}  # 8->8 geometry at the 8->16 conv
    with pytest.raises(ValueError):
        restore_graph(make_net(), {"version": graph["version"], "blocks": [wrong]})


# ---------------------------------------------------------------------------
# BN recalibration
# ---------------------------------------------------------------------------
def test_recalibrate_bn_exact_cumulative_stats_only_given_bns():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, 1, 1), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
        nn.Conv2d(6, 5, 3, 2, 1), nn.BatchNorm2d(5, momentum=0.1), nn.Dropout(0.5), nn.ReLU(),
    ).double()
    randomize_bns(model, 3)
    model.train()
    model[0].eval()  # mixed flags must be restored exactly
    flags = [m.training for m in model.modules()]
    bn1, bn2 = model[1], model[4]
    bn1_state = {k: v.clone() for k, v in bn1.state_dict().items()}
    bn2_affine = (bn2.weight.detach().clone(), bn2.bias.detach().clone())
    batches = [torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3)]

    # Reference: the input of bn2 with everything else in eval mode, per batch.
    with torch.no_grad():
        def bn2_input(x):
            h = F.conv2d(x, model[0].weight, model[0].bias, 1, 1)
            h = F.batch_norm(h, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, False, 0.0, bn1.eps)
            return F.conv2d(F.relu(h), model[3].weight, model[3].bias, 2, 1)
        feats = [bn2_input(x) for x in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats])
    variances = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats])

    used = recalibrate_bn(model, iter(batches), bns=[bn2], num_iters=20)
    assert used == 3
    assert torch.allclose(bn2.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    # equal batch sizes: the cumulative mean of batch means is the mean over all samples
    assert torch.allclose(bn2.running_mean, torch.cat(feats).mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn2.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)
    assert int(bn2.num_batches_tracked) == 3
    for k, v in bn1.state_dict().items():
        assert torch.equal(v, bn1_state[k]), k
    assert torch.equal(bn2.weight, bn2_affine[0]) and torch.equal(bn2.bias, bn2_affine[1])
    assert bn2.momentum == 0.1 and bn1.momentum == 0.3
    assert [m.training for m in model.modules()] == flags

    # num_iters caps the batches used; a single batch gives exactly that batch's statistics
    used = recalibrate_bn(model, batches, bns=[bn2], num_iters=1)
    assert used == 1
    assert torch.allclose(bn2.running_mean, means[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn2.running_var, variances[0], rtol=1e-12, atol=1e-12)
    assert [m.training for m in model.modules()] == flags


def test_recalibrate_bn_default_all_bns_and_empty_iterator():
    model = make_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_bn(model, [], num_iters=5) == 0
    x = batch(1)[0]
    assert recalibrate_bn(model, [x, x], num_iters=5) == 2
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items()
               if k.endswith("running_mean") and not torch.equal(v, before[k])}
    assert changed == {"1", "4", "7", "10", "13"}
    # parameters untouched
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------------------
# Typed plans and events (JSON stays what older dyrep-ray versions wrote)
# ---------------------------------------------------------------------------
def test_plan_and_events_are_frozen_and_read_old_json():
    import dataclasses

    from dyrep_ray.rep import CutEvent, GrowEvent, event_from_json

    old_plan = {"version": 1, "grow": [{"path": "0", "seed": 7}], "notes": ["n"], "adjust_index": 2,
                "init_gamma": 0.01, "scores": {"0": 1.5},
                "cut": [{"path": "3", "branches": ["1x1"], "collapses": False, "importance": {"1x1": 0.05}}]}
    plan = Plan.from_json(old_plan)
    assert plan.grow[0].path == "0" and plan.grow[0].seed == 7 and plan.cut[0].branches == ("1x1",)
    assert plan.cut_mode == "reset" and plan.notes == ("n",) and plan.adjust_index == 2
    assert plan.cut[0].seed is None and isinstance(plan.cut[0].effective_seed, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cut_mode = "absorb"
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    with pytest.raises(ValueError):
        Plan.from_json({**old_plan, "cut_mode": "fold"})
    with pytest.raises(ValueError):
        Plan.from_json({**old_plan, "grow": [{"seed": 1}]})
    # events: the dicts metrics.jsonl always held
    model = grown_net(paths=("3",))
    events = apply_plan(model, {"version": 1, "grow": [{"path": "0", "seed": 1}], "notes": [],
                                "cut": [{"path": "3", "branches": ["1x1"]}]})
    assert [type(e) for e in events] == [GrowEvent, CutEvent]
    as_json = [e.to_json() for e in events]
    assert as_json[0] == {"op": "grow", "path": "0", "branches": list(model[0].branch_names)}
    assert as_json[1] == {"op": "cut", "path": "3", "branches": ["1x1"], "collapsed": False,
                          "remaining": list(model[3].branch_names)}
    assert [event_from_json(json.loads(json.dumps(j))) for j in as_json] == events
    with pytest.raises(ValueError):
        event_from_json({"op": "prune", "path": "3"})


# ---------------------------------------------------------------------------
# Static DBB baseline (the original's --dbb)
# ---------------------------------------------------------------------------
def test_convert_to_dbb_standard_init_graph_restore_deploy_and_training():
    from dyrep_ray.rep import convert_to_dbb, deploy

    model = make_net()
    converted = convert_to_dbb(model, seed=4)
    assert converted == ELIGIBLE
    assert all(isinstance(model.get_submodule(p), DiverseBranchBlock) for p in converted)
    assert DyRep(model, max_depth=1).eligible_names == []  # nothing left to grow at depth 1
    for p in converted:  # standard DBB init: every BN gamma 1, beta 0, fresh stats
        for bn in (m for m in model.get_submodule(p).modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
            assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # seeded: the same seed builds bit-identical models, another seed does not
    twin, other = make_net(), make_net()
    convert_to_dbb(twin, seed=4)
    convert_to_dbb(other, seed=5)
    assert_state_dicts_bit_identical(model, twin)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    # trains: every parameter gets a gradient
    model.train()
    x, y = batch(11)
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    # graph round trip + strict load + deploy exact
    randomize_bns(model, 12)
    before = eval_out(model, x)
    graph = json.loads(json.dumps(structure_graph(model)))
    rebuilt = restore_graph(make_net(seed=3), graph)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rel_err(eval_out(rebuilt, x), before) <= 1e-10
    assert rel_err(eval_out(deploy(model), x), before) <= 1e-10


def test_convert_to_dbb_function_preserving_option_and_depth():
    from dyrep_ray.rep import convert_to_dbb

    model = make_net()
    x, _ = batch(12)
    before = eval_out(model, x)
    convert_to_dbb(model, seed=1, init_gamma=0.01)  # DyRep's grow init: the function is kept
    assert rel_err(eval_out(model, x), before) <= 1e-10
    deep = make_net()
    paths = convert_to_dbb(deep, seed=1, max_depth=2)
    assert "0.branches.kxk.conv" in paths and "0.branches.1x1_kxk.conv2" in paths
    assert isinstance(deep.get_submodule("0.branches.kxk.conv"), DiverseBranchBlock)
    with pytest.raises(ValueError):
        convert_to_dbb(make_net(), max_depth=0)


def test_controller_load_state_dict_refuses_unknown_accumulators(caplog):
    model = make_net()
    ctrl = DyRep(model)
    train_steps(model, ctrl, 1, seed=3)
    state = ctrl.state_dict()
    other = DyRep(copy.deepcopy(model))
    bad = {**state, "sums": {**state["sums"], "12": torch.tensor(1.0)}}  # a 1x1 conv: never a candidate
    with pytest.raises(ValueError, match="not growth candidates"):
        other.load_state_dict(bad)
    assert other.adjust_count == 0 and all(float(v) == 0.0 for v in other.state_dict()["sums"].values())
    partial = {**state, "sums": {k: v for k, v in state["sums"].items() if k != "0"}}
    with caplog.at_level("WARNING", logger="dyrep_ray.rep.controller"):
        other.load_state_dict(partial)
    assert "restart from zero" in caplog.text
    assert other.metric_scores()["3"] == ctrl.metric_scores()["3"] and other.metric_scores()["0"] == 0.0
    # the structure may change before loading (resume: graph restored after the controller was built)
    grown = make_net()
    late = DyRep(grown)
    grow_conv(grown, "0", seed=1)
    late_state = DyRep(grown).state_dict()
    late.load_state_dict(late_state)
    assert "0.branches.kxk.conv" in late.eligible_names


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_record_metrics_accumulates_low_precision_grads_in_float32(low):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    ctrl = DyRep(model, metric="synflow")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=gen) * 1e-3
    grad = torch.randn(4, 3, 3, 3, generator=gen) * 1e-3
    with torch.no_grad():
        model[0].weight.data = weight.to(low)
    model[0].weight.grad = grad.to(low)
    ctrl.record_metrics()
    expected = float((grad.to(low).double() * weight.to(low).double()).sum())
    assert ctrl.metric_scores()["0"] == pytest.approx(expected, rel=1e-5)
