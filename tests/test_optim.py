"""Optimizer surgery after DyRep structure changes (SGD, SGD+nesterov, AdamW; two param groups).

Checks state identity of surviving parameters, removal of dead ones, group placement of new
ones, unchanged hyper-parameters/scheduler position, and the next optimizer step written out
by hand (so kept momentum/moments are shown to be *used*).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD, AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR

from dyrep_ray.rep import DyRep, param_groups_for, update_optimizer

WD = 5e-4
BASE_LR = {"sgd": 0.1, "sgd_nesterov": 0.1, "adamw": 1e-3}
OPTIMIZERS = {
    "sgd": lambda groups: SGD(groups, lr=BASE_LR["sgd"], momentum=0.9),
    "sgd_nesterov": lambda groups: SGD(groups, lr=BASE_LR["sgd_nesterov"], momentum=0.9, nesterov=True),
    "adamw": lambda groups: AdamW(groups, lr=BASE_LR["adamw"], betas=(0.9, 0.99)),
}
STATE_KEYS = {"sgd": ("momentum_buffer",), "sgd_nesterov": ("momentum_buffer",),
              "adamw": ("step", "exp_avg", "exp_avg_sq")}


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 10, 10, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def backward(model, seed):
    model.train()
    x, y = data(seed)
    F.cross_entropy(model(x), y).backward()


def train_step(model, opt, seed):
    opt.zero_grad()
    backward(model, seed)
    opt.step()


def no_decay_by_hand(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias")


def snapshot(model, opt):
    """id(param) -> (name, param, group index, {state key: (tensor object, value copy)})."""
    names = {id(p): n for n, p in model.named_parameters()}
    snap = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            state = {k: (v, v.clone()) for k, v in opt.state.get(p, {}).items()}
            snap[id(p)] = (names[id(p)], p, gi, state)
    return snap


def group_index(opt, p) -> int:
    hits = [gi for gi, g in enumerate(opt.param_groups) if any(q is p for q in g["params"])]
    assert len(hits) == 1, hits
    return hits[0]


def check_surgery(before, model, opt, kind, hypers, expect_removed: set[str], expect_added_prefixes: tuple[str, ...]):
    live = dict(model.named_parameters())
    live_ids = {id(p) for p in live.values()}
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}), "a parameter is held twice"
    assert {id(p) for p in held} == live_ids, "optimizer does not hold exactly the model's parameters"

    removed = set()
    for pid, (name, p, gi, state) in before.items():
        if pid in live_ids:
            assert group_index(opt, p) == gi, f"{name} changed group"
            assert set(opt.state[p]) == set(state), name
            for k, (obj, value) in state.items():
                assert opt.state[p][k] is obj, f"{name}: state '{k}' replaced"
                assert torch.equal(obj, value), f"{name}: state '{k}' modified"
        else:
            removed.add(name)
            assert state and set(state) == set(STATE_KEYS[kind]), f"{name} had no state: test would be vacuous"
            assert p not in opt.state, f"removed {name} kept its state"
            assert all(q is not p for q in held)
    assert removed == expect_removed

    added = {n: p for n, p in live.items() if id(p) not in before}
    assert added, "surgery added nothing: test would be vacuous"
    for name, p in added.items():
        assert name.startswith(expect_added_prefixes), name
        expected_group = 0 if no_decay_by_hand(name, p) else 1
        assert group_index(opt, p) == expected_group, f"{name} in wrong group"
        assert len(opt.state.get(p, {})) == 0, f"new {name} has state"
    assert any(not no_decay_by_hand(n, p) for n, p in added.items())
    assert any(no_decay_by_hand(n, p) for n, p in added.items())
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == hypers
    return added


def expected_sgd_update(p0, g, buf0, lr, wd, mu, nesterov):
    d_p = g + wd * p0
    buf = mu * buf0 + d_p
    upd = d_p + mu * buf if nesterov else buf
    return p0 - lr * upd, buf


def test_param_groups_for_by_hand():
    model = make_net()
    groups = param_groups_for(model, WD, filter_bias_and_bn=True)
    assert [g["weight_decay"] for g in groups] == [0.0, WD]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == {
        "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "7.weight", "7.bias", "11.bias"}
    assert {names[id(p)] for p in groups[1]["params"]} == {"0.weight", "3.weight", "6.weight", "11.weight"}
    single = param_groups_for(model, WD, filter_bias_and_bn=False)
    assert len(single) == 1 and len(single[0]["params"]) == len(list(model.parameters()))
    assert len(param_groups_for(model, 0.0)) == 1


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optimizer_surgery_grow_cut_collapse(kind):
    model = make_net()
    opt = OPTIMIZERS[kind](param_groups_for(model, WD, filter_bias_and_bn=True))
    sched = CosineAnnealingLR(opt, T_max=10)
    for t in range(2):
        train_step(model, opt, t)
        sched.step()
    hypers = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert hypers[0][0] < BASE_LR[kind]  # the scheduler has moved
    last_epoch = sched.last_epoch
    d = DyRep(model, grow_optim_state="carry")  # the kxk conv keeps its state (the default restarts it)

    # --- surgery 1: grow conv 3 (had a bias: that Parameter disappears) and conv 0
    before = snapshot(model, opt)
    w3, w0 = model[3].weight, model[0].weight
    d.apply({"version": 1, "grow": [{"path": "3", "seed": 1}, {"path": "0", "seed": 2}], "cut": [], "notes": []}, opt)
    assert model[3].kxk_branch.conv.weight is w3 and model[0].kxk_branch.conv.weight is w0
    check_surgery(before, model, opt, kind, hypers, expect_removed={"3.bias"},
                  expect_added_prefixes=("3.branches.", "0.branches."))
    assert sched.last_epoch == last_epoch

    # --- one step by hand: kept state is used, new params get fresh state
    opt.zero_grad()
    backward(model, 10)
    p = w3
    p0, g = p.detach().clone(), p.grad.clone()
    lr, wd = opt.param_groups[1]["lr"], opt.param_groups[1]["weight_decay"]
    if kind == "adamw":
        m0, v0 = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
        step0 = float(opt.state[p]["step"])
    else:
        buf0 = opt.state[p]["momentum_buffer"].clone()
    opt.step()
    if kind == "adamw":
        assert float(opt.state[p]["step"]) == step0 + 1 == 3
        assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * m0 + 0.1 * g, rtol=1e-6, atol=1e-9)
        assert torch.allclose(opt.state[p]["exp_avg_sq"], 0.99 * v0 + 0.01 * g * g, rtol=1e-6, atol=1e-12)
        new_p = model[3].branches["1x1"].conv.weight
        assert float(opt.state[new_p]["step"]) == 1
    else:
        expected_p, expected_buf = expected_sgd_update(p0, g, buf0, lr, wd, 0.9, kind == "sgd_nesterov")
        assert torch.allclose(opt.state[p]["momentum_buffer"], expected_buf, rtol=1e-6, atol=1e-8)
        assert torch.allclose(p.detach(), expected_p, rtol=1e-6, atol=1e-8)
    for name, q in model.named_parameters():
        assert set(opt.state[q]) == set(STATE_KEYS[kind]), name

    # --- surgery 2: cut two branches of block 3, collapse block 0 into a conv with bias
    before = snapshot(model, opt)
    cut3 = ["1x1", "identity"]
    removed_names = {n for n, _ in model.named_parameters()
                     if n.startswith("0.") or any(n.startswith(f"3.branches.{b}.") for b in cut3)}
    d.apply({"version": 1, "grow": [], "notes": [],
             "cut": [{"path": "3", "branches": cut3},
                     {"path": "0", "branches": [b for b in model[0].branch_names if b != "kxk"]}]}, opt)
    assert type(model[0]) is nn.Conv2d and model[0].bias is not None
    added = check_surgery(before, model, opt, kind, hypers, expect_removed=removed_names,
                          expect_added_prefixes=("0.",))
    assert set(added) == {"0.weight", "0.bias"}
    assert group_index(opt, model[0].weight) == 1 and group_index(opt, model[0].bias) == 0
    assert sched.last_epoch == last_epoch

    # --- surgery 3: the controller's own plan (metric-driven grow) through DyRep.step
    opt.zero_grad()
    backward(model, 11)
    d.record_metrics()
    before = snapshot(model, opt)
    events = d.step(opt)
    grown = [e.path for e in events if e.op == "grow"]
    assert len(grown) == 1
    check_surgery(before, model, opt, kind, hypers, expect_removed=set(),
                  expect_added_prefixes=(f"{grown[0]}.",))

    # scheduler keeps its position and formula
    sched.step()
    assert sched.last_epoch == last_epoch + 1
    for g in opt.param_groups:
        base = BASE_LR[kind]
        assert g["lr"] == pytest.approx(base * (1 + math.cos(math.pi * (last_epoch + 1) / 10)) / 2, rel=1e-9)
    train_step(model, opt, 12)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_update_optimizer_counts_and_single_group():
    model = make_net()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    train_step(model, opt, 0)
    n_before = len(list(model.parameters()))
    d = DyRep(model)
    d.grow("3")  # no optimizer: update by hand below
    n_after = len(list(model.parameters()))
    counts = update_optimizer(opt, model)
    new = [p for p in model.parameters() if p not in opt.state]
    assert counts == {"kept": n_before - 1, "removed": 1, "added": n_after - (n_before - 1)}
    assert len(new) == counts["added"]
    assert len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    assert update_optimizer(opt, model) == {"kept": n_after, "removed": 0, "added": 0}  # idempotent
    train_step(model, opt, 1)
