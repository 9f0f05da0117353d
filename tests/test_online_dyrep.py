"""``dyrep_block: online`` end to end: the DyRep controller growing, cutting, nesting, exporting and deploying
:class:`~dyrep_ray.rep.online.OnlineBlock`, replicas and EMA copies following plans, optimizer order, MAC
counts, ``torch.compile`` of grown models, and a real ``--local`` run that grows, resumes exactly and converts.

Expected values come from the models themselves before the change (function preservation), from a fresh
model (strict loads, fresh optimizers) or from hand rules, never from the implementation under test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.engine.ema import ModelEma
from dyrep_ray.engine.faults import RaiseAt
from dyrep_ray.engine.loop import model_digest
from dyrep_ray.integrations.common import canonical_param_order
from dyrep_ray.models import build_model, count_macs
from dyrep_ray.rep import (
    DiverseBranchBlock,
    DyRep,
    OnlineBlock,
    Plan,
    apply_plan,
    deploy,
    restore_graph,
    structure_graph,
)
from dyrep_ray.rep.geometry import KXK
from dyrep_ray.rep.optim import param_groups_for
from dyrep_ray.rep.paths import iter_blocks
from dyrep_ray.rundir.layout import STRUCTURE_FILE
from tests.helpers import LOCAL_TINY, RESUME_ATOL, final_model, max_abs_diff, rel_err, run_local, run_metrics
from tests.test_dyrep import ELIGIBLE, batch, eval_out, make_net

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = (torch.float64, torch.float32)
ONLINE = ["dyrep_block=online"]


def online_ctrl(model: nn.Module, **kw) -> DyRep:
    return DyRep(model, block_type="online", **kw)


def no_recal(calls: list):
    def recal(model, bns):
        calls.append(list(bns))
    return recal


@torch.no_grad()
def set_scales(block: OnlineBlock, means: dict[str, float], seed: int = 0) -> None:
    """Give each named branch per-channel scales of mean |scale| = ``means[name]`` (signs mixed)."""
    gen = torch.Generator().manual_seed(seed)
    for name, value in means.items():
        scale = block.branches[name].scale
        signs = torch.where(torch.rand(scale.shape, generator=gen) < 0.5, -1.0, 1.0).to(scale.dtype)
        scale.copy_(signs * value)


@torch.no_grad()
def train_like(model: nn.Module, seed: int) -> None:
    """Perturb every parameter of the blocks (as training would), so nothing sits at its init value."""
    gen = torch.Generator().manual_seed(seed)
    for _, block in iter_blocks(model):
        for p in block.parameters(recurse=False):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.05)
        for branch in block.branches.values():
            for p in branch.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.05)
            for child in branch.children():
                if isinstance(child, nn.Conv2d):
                    child.weight.add_(torch.randn(child.weight.shape, generator=gen,
                                                  dtype=torch.float64).to(child.weight.dtype) * 0.05)


# ---------------------------------------------------------------------------------------------------------------
# grow, nested growth
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ELIGIBLE)
def test_controller_grow_is_exact_in_train_and_eval_mode_without_recalibration(path, dtype):
    net = make_net(dtype)
    x, _ = batch(1, dtype)
    before_eval = eval_out(net, x)
    calls: list = []
    ctrl = online_ctrl(net)
    block = ctrl.grow(path, recal_fn=no_recal(calls))
    assert isinstance(block, OnlineBlock) and net.get_submodule(path) is block
    assert calls == []  # no BNs in an online block: nothing to recalibrate
    assert rel_err(eval_out(net, x), before_eval) <= TOL[dtype]
    assert all(float(v) == pytest.approx(0.01 if n != KXK else 1.0)
               for n, v in block.branch_importance().items())
    assert f"{path}.branches.kxk.conv" in ctrl.eligible_names and path not in ctrl.eligible_names


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_growth_in_the_kxk_and_1x1_kxk_slots_is_exact_and_depth_limited(dtype):
    net = make_net(dtype)
    x, _ = batch(2, dtype)
    ctrl = online_ctrl(net)
    ctrl.grow("3")
    train_like(net, seed=3)
    before = eval_out(net, x)
    inner = ctrl.grow("3.branches.kxk.conv")
    inner_kxk = ctrl.grow("3.branches.1x1_kxk.conv2")
    assert isinstance(inner, OnlineBlock) and isinstance(inner_kxk, OnlineBlock)
    assert inner_kxk.branch_names == ["1x1_kxk", "1x1_avg", KXK]  # padding 0: the reduced set
    assert rel_err(eval_out(net, x), before) <= TOL[dtype]
    # depth 2 reached: nothing inside the nested blocks may grow
    assert not any(n.startswith("3.branches.kxk.conv.") or n.startswith("3.branches.1x1_kxk.conv2.")
                   for n in ctrl.eligible_names)
    # the nested blocks are linear in train mode too: the assembled kernel is the function
    with torch.no_grad():
        kernel, bias = net[3].equivalent_kernel()
        h = net[2](net[1](net[0](x)))
        assert rel_err(net[3](h), F.conv2d(h, kernel, bias, 1, 1)) <= TOL[dtype]


def test_bn_controller_does_not_grow_inside_online_blocks_and_refuses_online_plans():
    net = make_net()
    online_ctrl(net).grow("0")
    bn_ctrl = DyRep(net)
    assert not any(n.startswith("0.") for n in bn_ctrl.eligible_names)
    plan = Plan.from_json({**online_ctrl(make_net()).plan().to_json(), "grow": [{"path": "3", "seed": 1}]})
    assert plan.block_type == "online"
    with pytest.raises(ValueError, match="online"):
        bn_ctrl.apply(plan)


# ---------------------------------------------------------------------------------------------------------------
# cut: the planner rule on online scales, both modes
# ---------------------------------------------------------------------------------------------------------------
def hand_cut(importance: dict[str, float], lam: float = 0.1, gate: float = 0.02) -> set[str]:
    valid = [v for n, v in importance.items() if n != KXK and v != 1.0]
    mean = sum(valid) / len(valid)
    std = (sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)) ** 0.5
    return {n for n, v in importance.items() if n != KXK and std > gate and v < mean and v < lam} if len(valid) > 1 \
        else set()


@pytest.mark.parametrize("mode", ["reset", "absorb"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_planned_cut_follows_the_scale_rule_and_preserves_the_function(mode, dtype):
    net = make_net(dtype)
    ctrl = online_ctrl(net, cut_mode=mode)
    ctrl.grow("3")
    train_like(net, seed=5)
    block = net[3]
    set_scales(block, {KXK: 0.8, "1x1": 0.4, "1x1_kxk": 0.02, "1x1_avg": 0.05, "1xk": 0.3, "kx1": 0.07,
                       "identity": 0.6})
    kxk_scale = block.kxk_scale().detach().clone()
    importance = {n: float(v) for n, v in block.branch_importance().items()}
    expected = hand_cut(importance)
    assert expected == {"1x1_kxk", "1x1_avg", "kx1"}
    x, _ = batch(3, dtype)
    before = eval_out(net, x)
    plan = ctrl.plan()
    assert plan.block_type == "online" and plan.cut_mode == mode
    assert [(c.path, set(c.branches)) for c in plan.cut] == [("3", expected)]
    ctrl.apply(Plan(cut=plan.cut, cut_mode=mode, block_type="online"))
    assert set(block.branch_names) == set(importance) - expected
    assert rel_err(eval_out(net, x), before) <= TOL[dtype]
    if mode == "reset":
        assert torch.equal(block.kxk_scale().detach(), torch.ones_like(kxk_scale))
    else:
        assert torch.equal(block.kxk_scale().detach(), kxk_scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reset_cut_reinitialises_a_nested_block_and_stays_exact(dtype):
    net = make_net(dtype)
    ctrl = online_ctrl(net, cut_mode="reset")
    ctrl.grow("3")
    inner = ctrl.grow("3.branches.kxk.conv")
    train_like(net, seed=7)
    x, _ = batch(4, dtype)
    before = eval_out(net, x)
    inner_scales = {n: b.scale.detach().clone() for n, b in inner.branches.items() if n != KXK}
    ctrl.cut("3", ["1x1", "identity"])
    assert rel_err(eval_out(net, x), before) <= TOL[dtype]
    for name, old in inner_scales.items():  # re-drawn at init_gamma
        assert torch.equal(inner.branches[name].scale.detach(), torch.full_like(old, ctrl.init_gamma))
    assert torch.equal(net[3].kxk_scale().detach(), torch.ones_like(net[3].kxk_scale()))


def test_absorb_planner_skips_a_block_whose_kxk_scale_is_zero():
    net = make_net()
    ctrl = online_ctrl(net, cut_mode="absorb")
    ctrl.grow("3")
    set_scales(net[3], {"1x1": 0.4, "1x1_kxk": 0.02, "1x1_avg": 0.05, "1xk": 0.3, "kx1": 0.07, "identity": 0.6})
    with torch.no_grad():
        net[3].kxk_scale()[2] = 0.0
    plan = ctrl.plan()
    assert plan.cut == () and any("kxk scale" in n for n in plan.notes)


def test_lone_branch_collapse_gives_the_users_bias_layout_and_regrows():
    net = make_net()
    ctrl = online_ctrl(net, cut_lone_branch=True)
    for path in ("0", "3"):
        ctrl.grow(path)
        block = net.get_submodule(path)
        ctrl.cut(path, [n for n in block.branch_names if n not in (KXK, "1x1")])
    x, _ = batch(5)
    before = eval_out(net, x)
    plan = ctrl.plan()  # the lone 1x1 at 0.01 < λ: both blocks collapse
    assert {c.path for c in plan.cut if c.collapses} == {"0", "3"}
    ctrl.apply(Plan(cut=plan.cut, block_type="online"))
    assert type(net[0]) is nn.Conv2d and net[0].bias is None and net[3].bias is not None
    assert rel_err(eval_out(net, x), before) <= TOL[torch.float64]
    assert {"0", "3"} <= set(ctrl.eligible_names)


# ---------------------------------------------------------------------------------------------------------------
# structure graph, deploy, replicas, EMA, optimizer order, MACs
# ---------------------------------------------------------------------------------------------------------------
def grown_online_net(dtype=torch.float64, cut_mode: str = "reset") -> tuple[nn.Sequential, DyRep]:
    net = make_net(dtype)
    ctrl = online_ctrl(net, cut_mode=cut_mode, cut_lone_branch=True)
    for path in ("0", "3", "6", "9"):
        ctrl.grow(path)
    ctrl.grow("3.branches.kxk.conv")
    ctrl.grow("6.branches.1x1_kxk.conv2")
    ctrl.cut("3", ["1x1", "kx1"])
    ctrl.cut("3.branches.kxk.conv", ["identity"])
    ctrl.cut("9", [n for n in net[9].branch_names if n != KXK])  # collapses: a conv entry in the graph
    train_like(net, seed=9)
    return net, ctrl


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_export_restore_strict_load_and_deploy_into_the_untouched_model(dtype):
    net, _ = grown_online_net(dtype)
    graph = json.loads(json.dumps(structure_graph(net)))
    types = {e["path"]: e["type"] for e in graph["blocks"]}
    assert types == {"0": "online", "3": "online", "6": "online", "3.branches.kxk.conv": "online",
                     "6.branches.1x1_kxk.conv2": "online", "9": "conv"}
    fresh = restore_graph(make_net(dtype, seed=42), graph)
    fresh.load_state_dict(net.state_dict(), strict=True)
    x, _ = batch(6, dtype)
    assert torch.equal(eval_out(fresh, x), eval_out(net, x))
    assert structure_graph(fresh) == graph
    net.train()
    assert torch.equal(fresh.train()(x), net(x))  # no BN inside the blocks: train mode agrees too
    deployed = deploy(net)
    untouched = make_net(dtype, seed=43)
    untouched.load_state_dict(deployed.state_dict(), strict=True)
    assert rel_err(eval_out(untouched, x), eval_out(net, x)) <= TOL[dtype]
    assert not any(isinstance(m, OnlineBlock) for m in deployed.modules())


def test_plan_json_on_two_replicas_and_the_ema_copy_gives_identical_digests():
    a = make_net()
    b = copy.deepcopy(a)
    ctrl_a, ctrl_b = online_ctrl(a, metric="random", grow_topk=2), online_ctrl(b, metric="random", grow_topk=2)
    ema = ModelEma(a, decay=0.9)
    for _ in range(3):
        plan = ctrl_a.plan()
        wire = json.loads(json.dumps(plan.to_json()))
        assert wire["block_type"] == "online"
        ctrl_a.apply(plan)
        ctrl_b.apply(wire)
        apply_plan(ema.module, wire)
        assert model_digest(a) == model_digest(b)
        assert structure_graph(ema.module) == structure_graph(a)
        ema.update(a)  # same state_dict keys: the EMA follows the structure
    assert len(iter_blocks(a)) >= 3
    assert model_digest(ema.module) == model_digest(a)  # identical models averaged with themselves


def test_old_plan_json_without_block_type_reads_as_bn():
    plan = Plan.from_json({"version": 1, "grow": [{"path": "0", "seed": 3}], "cut": []})
    assert plan.block_type == "bn"
    net = make_net()
    apply_plan(net, plan)
    assert isinstance(net[0], DiverseBranchBlock)
    with pytest.raises(ValueError, match="block_type"):
        Plan(block_type="orepa")


@pytest.mark.parametrize("block_type", ["bn", "online"])
def test_surgery_keeps_module_order_so_positional_optimizer_state_lands_on_the_right_tensors(block_type):
    net = make_net()
    ctrl = DyRep(net, block_type=block_type)
    optimizer = torch.optim.SGD(param_groups_for(net, 5e-4), lr=0.1, momentum=0.9)
    x, y = batch(7)
    for path in ("3", "3.branches.kxk.conv", "0"):
        ctrl.grow(path, optimizer=optimizer)
        net.train()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        fresh_order = [[id(p) for p in g["params"]] for g in param_groups_for(net, 5e-4)]
        assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == fresh_order
    canonical_param_order(optimizer, net)  # now a no-op after DyRep's surgery
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == fresh_order
    # positional (index-keyed) save/load, as Lightning does, onto a model restored from the graph
    restored = restore_graph(make_net(seed=1), structure_graph(net))
    restored.load_state_dict(net.state_dict())
    optimizer2 = torch.optim.SGD(param_groups_for(restored, 5e-4), lr=0.1, momentum=0.9)
    optimizer2.load_state_dict(optimizer.state_dict())
    by_name = dict(net.named_parameters())
    for name, p in restored.named_parameters():
        assert torch.equal(optimizer2.state[p]["momentum_buffer"], optimizer.state[by_name[name]]["momentum_buffer"])


def test_count_macs_of_an_assembled_online_model_equals_the_plain_models():
    plain = make_net()
    size = (3, 12, 12)
    online, _ = grown_online_net()
    for _, block in iter_blocks(online):
        block.forward_path = "kernel"
    assert count_macs(online, size) == count_macs(plain, size)
    # on the branches path it counts what runs: the same convs a bn block of the same branches runs
    grown_paths = ("0", "3", "6")
    on_branches, as_bn = make_net(), make_net()
    for path in grown_paths:
        DyRep(on_branches, block_type="online").grow(path)
        DyRep(as_bn).grow(path)
    for _, block in iter_blocks(on_branches):
        block.forward_path = "branches"
    assert count_macs(on_branches, size) == count_macs(as_bn, size) > count_macs(plain, size)


def test_grown_models_compile_without_graph_breaks():
    for block_type in ("bn", "online"):
        model = build_model("small_cnn", 10)
        ctrl = DyRep(model, block_type=block_type)
        for name in ctrl.eligible_names[:2]:
            ctrl.grow(name)
        ctrl.grow(ctrl.eligible_names[0] if block_type == "bn" else next(
            n for n in ctrl.eligible_names if ".branches." in n))
        model.train()
        x = torch.randn(4, 3, 16, 16)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, (block_type, explanation.break_reasons)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        model.eval()
        with torch.no_grad():
            assert rel_err(compiled(x), model(x)) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# a real --local run with online blocks: grows, checkpoints, resumes exactly, converts
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("online") / "ref"
    cfg, summary = run_local(run_dir, [*LOCAL_TINY, *ONLINE])
    return run_dir, cfg, summary


def test_local_online_run_grows_online_blocks(online_run):
    run_dir, cfg, summary = online_run
    assert cfg.dyrep_block == "online" and cfg.dyrep_adjust_interval == 1 and cfg.epochs == 3
    assert summary["grows"] == 4
    graph = json.loads((run_dir / STRUCTURE_FILE).read_text())
    grown = {e["path"] for m in run_metrics(run_dir) for e in m["events"] if e["op"] == "grow"}
    assert {b["path"] for b in graph["blocks"] if b["type"] == "online"} == grown
    assert not any(b["type"] == "dbb" for b in graph["blocks"])
    model, _ = final_model(run_dir)
    assert sum(isinstance(m, OnlineBlock) for m in model.modules()) == len(grown)
    assert run_metrics(run_dir)[-1]["n_blocks"] == len(grown)


def test_local_online_run_resumes_exactly(online_run, tmp_path):
    ref_dir, _, _ = online_run
    run_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected fault"):
        run_local(run_dir, [*LOCAL_TINY, *ONLINE], [RaiseAt(epoch=2, marker=str(tmp_path / "fired"))])
    assert [m["epoch"] for m in run_metrics(run_dir)] == [1, 2]
    run_local(run_dir, [*LOCAL_TINY, *ONLINE])  # resumes from the epoch-2 checkpoint
    resumed, ckpt_b = final_model(run_dir)
    reference, ckpt_a = final_model(ref_dir)
    assert ckpt_a.graph == ckpt_b.graph
    worst = max_abs_diff(reference.state_dict(), resumed.state_dict())
    assert worst <= RESUME_ATOL, worst
    assert [m["epoch"] for m in run_metrics(run_dir)] == [1, 2, 3]


def test_convert_folds_the_online_run_with_top1_unchanged(online_run, tmp_path):
    from dyrep_ray.export import convert_checkpoint

    run_dir, _, _ = online_run
    result = convert_checkpoint(run_dir, tmp_path / "deployed.safetensors")
    info = result.info
    assert info["blocks_folded"] >= 2 and info["strict_load"] is True
    assert info["top1_after"] == info["top1_before"] == pytest.approx(run_metrics(run_dir)[-1]["val_top1"])
    assert info["params"]["deployed"] == info["params"]["plain"] < info["params"]["trained"]
    assert info["macs"]["deployed"] == info["macs"]["plain"]


def test_static_baseline_with_online_blocks(tmp_path):
    """``dbb: true`` with ``dyrep_block: online``: every eligible conv is an online block from the start (and the
    default bn block type still builds DBB blocks); the run trains, its graph names the type, convert folds it."""
    from dyrep_ray.export import convert_checkpoint

    run_dir = tmp_path / "static_online"
    _, summary = run_local(run_dir, [*LOCAL_TINY, "epochs=1", "dyrep=false", "dbb=true", "dyrep_block=online"])
    assert summary["grows"] == 0
    graph = json.loads((run_dir / STRUCTURE_FILE).read_text())
    assert graph["blocks"] and {b["type"] for b in graph["blocks"]} == {"online"}
    model, _ = final_model(run_dir)
    assert sum(isinstance(m, OnlineBlock) for m in model.modules()) == len(graph["blocks"])
    info = convert_checkpoint(run_dir, tmp_path / "deployed.safetensors").info
    assert info["strict_load"] is True and info["top1_after"] == pytest.approx(info["top1_before"])
