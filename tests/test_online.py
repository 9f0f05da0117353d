"""OnlineBlock (OREPA-style): one conv with an assembled kernel == the sum of its branches run separately.

References are independent ``F.conv2d`` / ``F.avg_pool2d`` computations of every branch on the input (no
kernel algebra); kernels, scales and biases are randomized before comparing.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dyrep_ray.rep import online_kernels as OK
from dyrep_ray.rep import transforms as T
from dyrep_ray.rep.geometry import BRANCH_NAMES, KXK, allowed_branches
from dyrep_ray.rep.online import (
    AUTO_PATH,
    BLOCK_TYPE,
    BRANCHES_PATH,
    KERNEL_PATH,
    SPLIT_PATH,
    OnlineBlock,
    grow_online_block,
    online_block_from_conv,
)
from dyrep_ray.rep.optim import param_groups_for, update_optimizer
from tests.helpers import rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
PADDINGS = {"k//2": lambda k: k // 2, "0": lambda k: 0, "k//2+1": lambda k: k // 2 + 1}
DTYPES = (torch.float64, torch.float32)


@torch.no_grad()
def randomize(block: nn.Module, seed: int) -> None:
    """Random kernels, scales (signed, around 1) and biases, drawn in float64 then cast."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in block.named_parameters():
        draw = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if name.endswith("scale"):
            p.copy_(draw * 0.5 + 1.0)
        elif name.endswith("bias"):
            p.copy_(draw)
        else:
            p.copy_(draw / math.sqrt(p[0].numel()))


def reference(block: OnlineBlock, x: torch.Tensor) -> torch.Tensor:
    """Every branch run on ``x`` as its own op sequence, scaled and summed (the DBB-style forward)."""
    k, s, p, g = block.kernel_size, block.stride, block.padding, block.groups
    out = 0
    for name, br in block.branches.items():
        if name == KXK:
            y = reference(br.conv, x) if isinstance(br.conv, OnlineBlock) else F.conv2d(x, br.conv.weight, None, s,
                                                                                          p, 1, g)
        elif name == "1x1":
            y = F.conv2d(x, br.conv.weight, None, s, 0, 1, g)
        elif name == "1x1_kxk":
            mid = F.conv2d(x, br.conv1.weight, None, 1, 0, 1, g)
            if isinstance(br.conv2, OnlineBlock):  # a nested block (padding 0) on the zero-padded 1x1 output
                y = reference(br.conv2, F.pad(mid, [p] * 4))
            else:
                y = F.conv2d(mid, br.conv2.weight, None, s, p, 1, g)
        elif name == "1x1_avg":
            y = F.avg_pool2d(F.pad(F.conv2d(x, br.conv1.weight, None, 1, 0, 1, g), [p] * 4), k, s, 0)
        elif name == "1xk":
            y = F.conv2d(x, br.conv.weight, None, s, (0, p), 1, g)
        elif name == "kx1":
            y = F.conv2d(x, br.conv.weight, None, s, (p, 0), 1, g)
        else:
            y = x
        out = out + y * br.scale.reshape(1, -1, 1, 1)
    if block.bias is not None:
        out = out + block.bias.reshape(1, -1, 1, 1)
    return out


def check_equivalence(block: OnlineBlock, x: torch.Tensor, dtype) -> None:
    with torch.no_grad():
        out = block(x)
        ref = reference(block, x)
        kernel, bias = block.equivalent_kernel()
        assert kernel.dtype == dtype and kernel.shape == (block.out_channels, block.in_channels // block.groups,
                                                          block.kernel_size, block.kernel_size)
        by_kernel = F.conv2d(x, kernel, bias, block.stride, block.padding, 1, block.groups)
        conv = block.to_conv()
        assert type(conv) is nn.Conv2d and (conv.bias is not None) == (block.bias is not None)
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == (
            (block.kernel_size,) * 2, (block.stride,) * 2, (block.padding,) * 2, block.groups)
        deployed = conv(x)
        forced = []  # every forward path, forced: the same function
        for path in (KERNEL_PATH, BRANCHES_PATH, SPLIT_PATH):
            if path != SPLIT_PATH or "1x1_kxk" in block.branches:
                block.forward_path = path
                forced.append((f"{path} path", block(x)))
        block.forward_path = AUTO_PATH
    for what, got in (("forward", out), *forced, ("equivalent_kernel", by_kernel), ("to_conv", deployed)):
        err = rel_err(got, ref)
        assert err <= TOL[dtype], f"{what} vs separate branches: rel err {err:.3g}"


@pytest.mark.parametrize("padding_kind", list(PADDINGS))
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_block_equals_its_branches_run_separately(k, stride, groups, padding_kind):
    c = 4
    g = c if groups == "dw" else groups
    padding = PADDINGS[padding_kind](k)
    for dtype in DTYPES:
        block = OnlineBlock(c, c, k, stride, padding, g, bias=True, dtype=dtype)
        assert block.branch_names == list(allowed_branches(c, c, k, stride, padding))
        randomize(block, seed=k * 1000 + stride * 100 + g * 10 + padding)
        x = torch.randn(2, c, 11, 10, generator=torch.Generator().manual_seed(k), dtype=dtype)
        check_equivalence(block, x, dtype)


@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
def test_block_equivalence_in_ne_out(stride, groups):
    c_in, c_out = 4, 8
    g = c_in if groups == "dw" else groups
    block = OnlineBlock(c_in, c_out, 3, stride, 1, g, dtype=torch.float64)
    assert "identity" not in block.branch_names and len(block.branch_names) == 6
    randomize(block, seed=stride + g)
    x = torch.randn(2, c_in, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_equivalence(block, x, torch.float64)


def test_gradients_equal_those_of_the_separate_branches():
    """The differentiable assembly gives every parameter (and the input) the gradient of the branch sum."""
    block = OnlineBlock(4, 4, 3, 1, 1, 2, bias=True, dtype=torch.float64)
    randomize(block, seed=5)
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    block(x).backward(grad)
    reference(twin, x2).backward(grad)
    assert rel_err(x.grad, x2.grad) <= 1e-12
    for (name, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
        assert p.grad is not None, name
        assert rel_err(p.grad, q.grad) <= 1e-10, name


def test_one_batch_sized_conv_per_step():
    """Cost independent of the branch count: the activations see exactly one convolution forward and one
    backward, whatever the number of branches (the kernel algebra never touches the batch), and no
    kernel-sized copies are made by in-place writes into views."""

    class ConvCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution" in func.__name__ or func.__name__.startswith("copy_"):
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    block = OnlineBlock(8, 8, 3, 1, 1)
    assert len(block.branch_names) == 7
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    assert not block._cheaper_on_activations(x)
    with ConvCounter() as counter:
        block(x).sum().backward()
    convs = [c.split(".")[0] for c in counter.calls if "convolution" in c]
    assert convs == ["convolution", "convolution_backward"]
    # CopySlices would add one kernel copy per centred branch; only the merge's einsum gradient (permuted
    # layout) is copied once
    assert len(counter.calls) - len(convs) <= 1


@pytest.mark.parametrize("padding_kind", list(PADDINGS))
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_branches_on_small_activations_are_the_same_function(k, stride, groups, padding_kind):
    """Wide conv, tiny activations: the branches run on the activations (assembling would cost more) --
    same outputs and gradients as the separate branches and as the always-assembled path."""
    c = 16
    g = c if groups == "dw" else groups
    block = OnlineBlock(c, c, k, stride, PADDINGS[padding_kind](k), g, bias=True, dtype=torch.float64)
    randomize(block, seed=21 + stride + g + k)
    x = torch.randn(1, c, k, k + 1, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    if groups != "dw":  # a depthwise kernel is tiny: either path may be estimated cheaper (forced below)
        assert block._cheaper_on_activations(x)
    assert not block._cheaper_on_activations(torch.zeros(16, c, 32, 32, dtype=torch.float64))
    block.forward_path = BRANCHES_PATH
    assembled = copy.deepcopy(block)
    assembled.forward_path = KERNEL_PATH
    twin = copy.deepcopy(block)
    grad = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    outs = [m(x) for m in (block, assembled)] + [reference(twin, x)]
    for out in outs:
        out.backward(grad)
    o0, o1, o2 = (o.detach() for o in outs)
    assert rel_err(o0, o2) <= 1e-12 and rel_err(o1, o2) <= 1e-12
    for (name, p), (_, q), (_, r) in zip(block.named_parameters(), assembled.named_parameters(),
                                         twin.named_parameters()):
        assert rel_err(p.grad, r.grad) <= 1e-10 and rel_err(q.grad, r.grad) <= 1e-10, name


def test_kernel_maths_matches_transforms():
    gen = torch.Generator().manual_seed(0)
    for g, (c_in, mid, c_out) in ((1, (4, 6, 8)), (2, (4, 8, 6)), (4, (4, 8, 4))):
        k1 = torch.randn(mid, c_in // g, 1, 1, generator=gen, dtype=torch.float64)
        k2 = torch.randn(c_out, mid // g, 5, 5, generator=gen, dtype=torch.float64)
        ref, _ = T.merge_1x1_kxk(k1, torch.zeros(mid, dtype=torch.float64), k2,
                                 torch.zeros(c_out, dtype=torch.float64), g)
        assert rel_err(OK.merge_1x1_kxk_kernel(k1, k2, g), ref) <= 1e-14
        k1a = torch.randn(c_out, c_in // g, 1, 1, generator=gen, dtype=torch.float64)
        avg = T.avg_pool_kernel(c_out, 5, g, like=k1a)
        ref_avg, _ = T.merge_1x1_kxk(k1a, torch.zeros(c_out, dtype=torch.float64), avg,
                                     torch.zeros(c_out, dtype=torch.float64), g)
        assert rel_err(OK.avg_branch_kernel(k1a, 5), ref_avg) <= 1e-14
    eye = OK.identity_matrix(6, 3, like=k1)
    assert torch.equal(T.pad_kernel_to(eye, 3), T.identity_kernel(6, 3, 3, like=k1))


# ---------------------------------------------------------------------------------------------------------------
# grow: function-preserving
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padding_kind", list(PADDINGS))
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_grow_is_function_preserving(k, stride, groups, padding_kind, bias):
    c = 4
    g = c if groups == "dw" else groups
    padding = PADDINGS[padding_kind](k)
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(k + 10 * stride + 100 * g)
        conv = nn.Conv2d(c, c, k, stride, padding, groups=g, bias=bias, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
            if bias:
                conv.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        x = torch.randn(2, c, 11, 10, generator=gen, dtype=dtype)
        with torch.no_grad():
            target = conv(x)
        weight_param, bias_param = conv.weight, conv.bias
        block = grow_online_block(conv, seed=k, init_gamma=0.01)
        assert block.branch_names == list(allowed_branches(c, c, k, stride, padding))
        assert block.kxk_branch.conv is conv and conv.weight is weight_param and conv.bias is None
        assert block.bias is bias_param and block.dyrep_orig_bias is bias
        for name, branch in block.branches.items():
            expected = 1.0 if name == KXK else 0.01
            assert torch.all(branch.scale == expected), name
        with torch.no_grad():
            err = rel_err(block(x), target)
        assert err <= TOL[dtype], f"grown block vs original conv: rel err {err:.3g}"
        check_equivalence(block, x, dtype)


def test_grow_is_seeded_and_rejects_ineligible_convs():
    def grown(seed):
        torch.manual_seed(0)
        return grow_online_block(nn.Conv2d(4, 4, 3, padding=1), seed=seed)

    a, b, c = grown(7), grown(7), grown(8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)
    assert not torch.equal(sa["branches.1x1.conv.weight"], sc["branches.1x1.conv.weight"])
    for bad in (nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, dilation=2, padding=2), nn.Conv2d(4, 4, (3, 5))):
        with pytest.raises(ValueError):
            grow_online_block(bad, seed=0)


def test_train_and_eval_mode_compute_the_same_function():
    block = grow_online_block(nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64), seed=1)
    randomize(block, seed=2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        train_out = block.train()(x)
        eval_out = block.eval()(x)
    assert torch.equal(train_out, eval_out)
    assert block.new_branch_batchnorms() == [] and not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())


# ---------------------------------------------------------------------------------------------------------------
# cut: importance and exact absorption
# ---------------------------------------------------------------------------------------------------------------
def test_branch_importance_is_mean_abs_scale_over_kxk():
    block = OnlineBlock(4, 4, 3, dtype=torch.float64)
    randomize(block, seed=3)
    imp = block.branch_importance()
    assert set(imp) == set(BRANCH_NAMES)
    ref = block.kxk_scale().detach().abs().mean()
    for name, value in imp.items():
        assert math.isclose(float(value), float(block.branches[name].scale.detach().abs().mean() / ref), rel_tol=1e-12)
    assert float(imp[KXK]) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2, "dw"])
def test_cut_keeps_the_function(groups, dtype):
    c = 4
    g = c if groups == "dw" else groups
    block = OnlineBlock(c, c, 5, 1, 2, g, bias=True, dtype=dtype)
    randomize(block, seed=g)
    x = torch.randn(2, c, 9, 9, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        before = block(x)
    block.cut(["1x1", "identity", "1x1_kxk"], mode="absorb")
    assert block.branch_names == ["1x1_avg", "kxk", "1xk", "kx1"]
    block.cut(["1x1_avg", "1xk", "kx1"], mode="absorb")
    assert block.branch_names == [KXK]
    with torch.no_grad():
        after = block(x)
        conv = block.to_conv()
        deployed = conv(x)
    assert rel_err(after, before) <= TOL[dtype] and rel_err(deployed, before) <= TOL[dtype]
    with pytest.raises(ValueError):
        block.cut([KXK])
    with pytest.raises(ValueError):
        block.cut(["1x1"])  # already gone


def test_cut_refuses_a_zero_kxk_scale():
    block = OnlineBlock(4, 4, 3)
    with torch.no_grad():
        block.kxk_scale()[1] = 0.0
    with pytest.raises(ValueError, match="zero scale"):
        block.cut(["1x1"], mode="absorb")
    assert "1x1" in block.branch_names


# ---------------------------------------------------------------------------------------------------------------
# nested growth: the kxk branch's conv becomes a block itself
# ---------------------------------------------------------------------------------------------------------------
def _nested(dtype, bias: bool):
    gen = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(4, 4, 3, 1, 1, bias=bias, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    outer = grow_online_block(conv, seed=1)
    randomize(outer, seed=12)  # trained for a while
    return outer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_nested_growth_cut_and_deploy_are_exact(dtype, bias):
    outer = _nested(dtype, bias)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13), dtype=dtype)
    with torch.no_grad():
        target = outer(x)
    inner_conv = outer.kxk_branch.conv
    inner = grow_online_block(inner_conv, seed=2)
    assert inner.bias is None and inner.kxk_branch.conv is inner_conv
    outer.kxk_branch.conv = inner
    with torch.no_grad():
        grown = outer(x)
    assert rel_err(grown, target) <= TOL[dtype]
    check_equivalence(outer, x, dtype)  # the reference recurses into the nested block
    randomize(outer, seed=14)
    with torch.no_grad():
        trained = outer(x)
    outer.cut(["1x1", "kx1"], mode="absorb")  # absorbed through the nested block's kxk branch
    inner.cut(["identity", "1x1_avg"], mode="absorb")
    with torch.no_grad():
        after = outer(x)
        deployed = outer.to_conv()(x)
    assert rel_err(after, trained) <= TOL[dtype] and rel_err(deployed, trained) <= TOL[dtype]
    with pytest.raises(ValueError):
        outer.compensate_kxk(*outer.equivalent_kernel())  # grow happens before nesting


def test_nested_block_gradients_reach_the_inner_branches():
    outer = _nested(torch.float64, bias=False)
    outer.kxk_branch.conv = grow_online_block(outer.kxk_branch.conv, seed=3)
    randomize(outer, seed=4)
    twin = copy.deepcopy(outer)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    outer(x).square().sum().backward()
    reference(twin, x).square().sum().backward()
    for (name, p), (_, q) in zip(outer.named_parameters(), twin.named_parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-10, name


# ---------------------------------------------------------------------------------------------------------------
# description, state_dict, optimizer
# ---------------------------------------------------------------------------------------------------------------
def _rebuild(entries: list[dict], base: nn.Module) -> nn.Module:
    """What a graph restore does: outermost first, replace the conv at each path by the described block."""
    for entry in sorted(entries, key=lambda e: e["path"].count(".")):
        parent_path, _, attr = entry["path"].rpartition(".")
        parent = base.get_submodule(parent_path) if parent_path else base
        setattr(parent, attr, OnlineBlock.from_description(entry, getattr(parent, attr)))
    return base


@pytest.mark.parametrize("bias", [False, True])
def test_describe_and_state_dict_round_trip(bias):
    def base():
        return nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=bias, dtype=torch.float64), nn.ReLU())

    model = base()
    model[0] = grow_online_block(model[0], seed=1)
    model[0].kxk_branch.conv = grow_online_block(model[0].kxk_branch.conv, seed=2)
    model[0].cut(["1x1"], mode="absorb")
    model[0].kxk_branch.conv.cut(["identity", "1xk"], mode="absorb")
    randomize(model, seed=3)
    entries = [{"path": name, **m.describe()} for name, m in model.named_modules() if isinstance(m, OnlineBlock)]
    entries = json.loads(json.dumps(entries))  # the graph is JSON
    assert [e["type"] for e in entries] == [BLOCK_TYPE, BLOCK_TYPE]
    assert entries[0]["bias"] is bias and entries[0]["orig_bias"] is bias and entries[1]["bias"] is False
    rebuilt = _rebuild(entries, base())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert "eye" not in "".join(model.state_dict())  # the identity constant is not state
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert rebuilt[0].branch_names == model[0].branch_names
    assert rebuilt[0].kxk_branch.conv.branch_names == model[0].kxk_branch.conv.branch_names
    with pytest.raises(ValueError):
        OnlineBlock.from_description(entries[0], nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(ValueError):
        OnlineBlock.from_description({**entries[0], "type": "dbb"}, nn.Conv2d(4, 4, 3, padding=1))


def test_collapsed_block_keeps_the_users_bias_layout():
    for bias in (False, True):
        block = grow_online_block(nn.Conv2d(4, 4, 3, padding=1, bias=bias), seed=0)
        block.cut([n for n in block.branch_names if n != KXK], mode="absorb")
        conv = block.fuse()
        assert (conv.bias is not None) is bias and conv.dyrep_orig_bias is bias
        regrown = online_block_from_conv(conv)  # a collapsed conv may grow again
        assert (regrown.bias is not None) is bias and regrown.dyrep_orig_bias is bias


def test_optimizer_surgery_keeps_the_kxk_state_and_adds_scales_without_decay():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(param_groups_for(model, 5e-4), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    optimizer.step()
    weight, bias = model[0].weight, model[0].bias
    momentum = optimizer.state[weight]["momentum_buffer"].clone()
    model[0] = grow_online_block(model[0], seed=0)
    counts = update_optimizer(optimizer, model)
    assert counts["removed"] == 0 and counts["added"] == len(list(model[0].parameters())) - 2
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], momentum) and bias in optimizer.state
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0)
    assert all(any(s is p for p in no_decay["params"]) for s in (b.scale for b in model[0].branches.values()))


# ---------------------------------------------------------------------------------------------------------------
# cut modes, the nested 1x1->kxk conv, per-forward MACs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
def test_reset_cut_sets_the_kxk_scale_to_one_and_keeps_the_function(dtype, nested):
    outer = _nested(dtype, bias=True)
    if nested:
        outer.kxk_branch.conv = grow_online_block(outer.kxk_branch.conv, seed=21)
    randomize(outer, seed=22)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(23), dtype=dtype)
    with torch.no_grad():
        before = outer(x)
    survivors = {n: outer.branches[n].scale.detach().clone() for n in ("1x1_kxk", "1xk")}
    outer.cut(["1x1", "identity", "kx1", "1x1_avg"], mode="reset", seed=5, init_gamma=0.02)
    with torch.no_grad():
        after = outer(x)
    assert rel_err(after, before) <= TOL[dtype]
    assert torch.equal(outer.kxk_scale().detach(), torch.ones(4, dtype=dtype))
    for name, scale in survivors.items():  # surviving branches untouched
        assert torch.equal(outer.branches[name].scale.detach(), scale)
    if nested:  # the nested block was re-drawn at init_gamma and compensated
        inner = outer.kxk_branch.conv
        assert all(torch.equal(b.scale.detach(), torch.full((4,), 0.02, dtype=dtype))
                   for n, b in inner.branches.items() if n != KXK)
    check_equivalence(outer, x, dtype)
    with pytest.raises(ValueError, match="cut mode"):
        outer.cut(["1xk"], mode="fold")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nested_block_in_the_1x1_kxk_slot_is_exact_on_both_forward_paths(dtype):
    outer = _nested(dtype, bias=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(31), dtype=dtype)
    with torch.no_grad():
        before = outer(x)
    branch = outer.branches["1x1_kxk"]
    inner = grow_online_block(branch.conv2, seed=32)
    assert inner.padding == 0 and inner.branch_names == ["1x1_kxk", "1x1_avg", KXK]
    branch.conv2 = inner
    randomize(inner, seed=33)
    with torch.no_grad():
        on_kernel = outer(x)
        outer.forward_path = "branches"
        on_branches = outer(x)
        expected = reference(outer, x)  # every branch of both blocks run on its own
    assert rel_err(on_branches, expected) <= TOL[dtype] and rel_err(on_kernel, expected) <= TOL[dtype]
    assert not torch.allclose(on_kernel, before)  # the nested block's randomized branches do contribute


def test_activation_macs_counts_the_path_forward_takes():
    block = OnlineBlock(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 6, 6)
    kxk = 2 * 6 * 6 * 8 * 8 * 9
    block.forward_path = "kernel"
    assert block.takes_kernel_path(x) and block.activation_macs(x) == kxk
    block.forward_path = "branches"
    # kxk + 1x1 + (1x1 then kxk, mid = in) + 1x1 of the avg branch + 1xk + kx1; identity and pooling: none
    pixels = 2 * 6 * 6
    hand = kxk + pixels * 64 + (pixels * 64 + pixels * 64 * 9) + pixels * 64 + 2 * pixels * 64 * 3
    assert not block.takes_kernel_path(x) and block.activation_macs(x) == hand


@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
def test_split_path_gradients_equal_the_separate_branches(stride, groups):
    """The split path (1x1->kxk on the activations, every other branch in the kernel): same outputs and
    gradients (input, every parameter) as the branches run separately."""
    c = 8
    g = c if groups == "dw" else groups
    block = OnlineBlock(c, c, 3, stride, 1, g, bias=True, dtype=torch.float64)
    randomize(block, seed=40 + stride + g)
    block.forward_path = SPLIT_PATH
    twin = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, c, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = block(x), reference(twin, x2)
    assert rel_err(out.detach(), ref.detach()) <= 1e-12
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    assert rel_err(x.grad, x2.grad) <= 1e-12
    for (name, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) <= 1e-10, name


def test_auto_path_is_decided_once_per_input_shape_and_recorded():
    """Wide conv on tiny activations: the split path is the cheapest estimate (the 1x1->kxk merge costs more
    than its convs, the other branches' assembly less); the decision is recorded per input shape and branch
    set, and a step looks it up without estimating again."""
    block = OnlineBlock(512, 512, 3, 1, 1)
    tiny, large = torch.zeros(32, 512, 2, 2), torch.zeros(32, 512, 16, 16)
    costs = block.path_costs(tiny)
    assert min(costs, key=costs.__getitem__) == SPLIT_PATH
    assert costs[SPLIT_PATH] < costs[BRANCHES_PATH] < costs[KERNEL_PATH]
    assert block.path_for(tiny) == SPLIT_PATH and block.path_for(large) == KERNEL_PATH
    assert sorted(block.chosen_paths.values()) == [KERNEL_PATH, SPLIT_PATH]
    calls = []
    original = block.path_costs
    block.path_costs = lambda x: calls.append(x.shape) or original(x)  # type: ignore[method-assign]
    block(torch.randn(32, 512, 2, 2))
    assert calls == []  # recorded: not estimated again
    block.cut(["1x1"])  # another branch set: decided again
    block.path_for(tiny)
    assert calls == [tiny.shape]
    block.forward_path = KERNEL_PATH
    assert block.path_for(tiny) == KERNEL_PATH


def test_assembly_under_cpu_autocast_gives_parameter_dtype_gradients():
    block = OnlineBlock(8, 8, 3, 1, 1, groups=2)
    randomize(block, seed=50)
    block.forward_path = KERNEL_PATH
    twin = copy.deepcopy(block)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        ref = reference(twin, x)
    out.float().sum().backward()
    ref.float().sum().backward()
    for (name, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
        assert p.grad.dtype == p.dtype and rel_err(p.grad, q.grad) <= 5e-2, name


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_used_taps_drop_only_taps_that_read_padding(k, stride):
    """A conv with only :func:`used_taps`' window of its kernel, and the padding it gives, computes the same output
    on every small map and padding; the window is a strict part of the kernel exactly where some tap never reads
    input (checked by brute force over the output pixels)."""
    gen = torch.Generator().manual_seed(60 + k + stride)
    for padding in range(k // 2 + 2):
        for h in range(1, 6):
            for w in range(1, 6):
                if h + 2 * padding < k or w + 2 * padding < k:
                    continue
                x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
                kernel = torch.randn(4, 3, k, k, generator=gen, dtype=torch.float64)
                full = F.conv2d(x, kernel, None, stride, padding)
                window = OK.used_taps(h, w, k, stride, padding)
                outputs = [(size + 2 * padding - k) // stride + 1 for size in (h, w)]
                live = [[i for i in range(k) if any(0 <= o * stride + i - padding < size for o in range(out))]
                        for size, out in zip((h, w), outputs)]
                if not all(live):  # no tap ever reads input: an all-zero output, nothing to gain
                    assert window is None
                    continue
                spans = [(taps[0], taps[-1] + 1) for taps in live]  # first to last used tap, per axis
                if window is None:  # every tap used, or a cut no symmetric padding expresses: nothing is cut
                    inexpressible = any(
                        padding - lo < 0 or (size + 2 * (padding - lo) - (hi - lo)) // stride != out - 1
                        for size, (lo, hi), out in zip((h, w), spans, outputs))
                    assert spans == [(0, k), (0, k)] or inexpressible, (h, w, padding)
                    continue
                top, bottom, left, right = window
                assert [(top, bottom), (left, right)] == spans and (bottom - top) * (right - left) < k * k
                cut = F.conv2d(x, kernel[..., top:bottom, left:right], None, stride,
                               (padding - top, padding - left))
                assert cut.shape == full.shape and rel_err(cut, full) <= 1e-12, (h, w, padding)
    assert OK.used_taps(1, 1, 3, 1, 1) == (1, 2, 1, 2) and OK.used_taps(2, 2, 3, 1, 1) is None
    assert OK.used_taps(2, 2, 3, 2, 1) == (1, 3, 1, 3) and OK.used_taps(1, 8, 3, 1, 1) == (1, 2, 0, 3)


@pytest.mark.parametrize("shape,stride", [((3, 16, 1, 1), 1), ((3, 16, 2, 2), 2), ((3, 16, 1, 5), 1)])
def test_assembled_paths_on_maps_smaller_than_the_kernel_reach_equal_the_separate_branches(shape, stride):
    """On a 1x1 map (and a 2x2 one at stride 2, a 1-row one) the kernel and split paths apply only the used taps:
    outputs and gradients (input, every parameter) equal the branches run separately; the MACs counted are the
    taps'; the deployed conv keeps the whole kxk kernel."""
    c = shape[1]
    block = OnlineBlock(c, c, 3, stride, 1, bias=True, dtype=torch.float64)
    randomize(block, seed=70 + stride)
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    window = block.used_taps(x)
    assert window is not None
    taps = (window[1] - window[0]) * (window[3] - window[2])
    for path in (KERNEL_PATH, SPLIT_PATH):
        block.forward_path = path
        twin = copy.deepcopy(block)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = block(x1), reference(twin, x2)
        assert rel_err(out.detach(), ref.detach()) <= 1e-12, path
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad)
        ref.backward(grad)
        assert rel_err(x1.grad, x2.grad) <= 1e-12, path
        for (name, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-10, (path, name)
        block.zero_grad(set_to_none=True)
    block.forward_path = KERNEL_PATH
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    assert block.activation_macs(x) == pixels * c * c * taps < pixels * c * c * 9
    assert block.to_conv().weight.shape[-2:] == (3, 3)
    with torch.no_grad():
        assert rel_err(block.to_conv()(x), reference(block, x)) <= 1e-12


def test_a_wide_conv_on_a_1x1_map_takes_the_split_path_with_only_its_centre_taps():
    """512 channels on a 1x1 map, batch 32 (ResNet-18's last stage on 32x32 images): every tap but the centre reads
    padding, so the 1x1->kxk merge of the centre alone still costs more than running that branch on the
    activations; the split path's estimate is now below the branches path's."""
    block = OnlineBlock(512, 512, 3, 1, 1)
    costs = block.path_costs(torch.zeros(32, 512, 1, 1))
    assert costs[SPLIT_PATH] < costs[KERNEL_PATH] < costs[BRANCHES_PATH]
