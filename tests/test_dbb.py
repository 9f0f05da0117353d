"""DiverseBranchBlock: eval-mode block == one conv (equivalent_kernel / to_conv), branch rules, cut.

References are plain ``F.conv2d`` / ``F.batch_norm`` computations; every BN has
randomized running statistics, affine parameters and eps before comparing.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.rep import BRANCH_NAMES, DiverseBranchBlock, allowed_branches
from dyrep_ray.rep.grow_cut import grow_conv
from tests.helpers import rel_err

ALL = set(BRANCH_NAMES)
CENTRED = {"1x1", "1xk", "kx1", "identity"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Random conv weights/biases and BN running stats, affine params and eps (drawn in f64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
            m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1.0)
            m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            m.eps = float(torch.rand((), generator=gen, dtype=torch.float64)) * 1e-3 + 1e-5


def expected_branches(c_in, c_out, k, stride, padding) -> set[str]:
    """The rule of DESIGN §3, written independently of the implementation."""
    names = set(ALL)
    if padding != k // 2:
        names -= CENTRED
    if c_in != c_out or stride != 1:
        names.discard("identity")
    return names


def check_block_equivalence(block: DiverseBranchBlock, x: torch.Tensor, dtype) -> tuple[float, float]:
    block.eval()
    with torch.no_grad():
        out = block(x)
        kernel, bias = block.equivalent_kernel()
        assert kernel.dtype == dtype and bias.dtype == dtype
        assert kernel.shape == (block.out_channels, block.in_channels // block.groups,
                                block.kernel_size, block.kernel_size)
        ref = F.conv2d(x, kernel, bias, stride=block.stride, padding=block.padding, groups=block.groups)
        conv = block.to_conv()
        assert type(conv) is nn.Conv2d and conv.bias is not None
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == (
            (block.kernel_size,) * 2, (block.stride,) * 2, (block.padding,) * 2, block.groups)
        assert conv.weight.dtype == dtype
        ref2 = conv(x)
    e1, e2 = rel_err(out, ref), rel_err(out, ref2)
    assert e1 <= TOL[dtype], f"block vs F.conv2d(equivalent_kernel): rel err {e1:.3g}"
    assert e2 <= TOL[dtype], f"block vs to_conv(): rel err {e2:.3g}"
    return e1, e2


PADDINGS = {"k//2": lambda k: k // 2, "0": lambda k: 0, "k//2+1": lambda k: k // 2 + 1}


@pytest.mark.parametrize("padding_kind", list(PADDINGS))
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_block_equals_its_equivalent_conv(k, stride, groups, padding_kind):
    c = 4
    g = c if groups == "dw" else groups
    padding = PADDINGS[padding_kind](k)
    for dtype in (torch.float64, torch.float32):
        block = DiverseBranchBlock(c, c, k, stride, padding, g, dtype=dtype)
        assert set(block.branch_names) == expected_branches(c, c, k, stride, padding)
        randomize(block, seed=k * 1000 + stride * 100 + g * 10 + padding)
        x = torch.randn(2, c, 11, 10, generator=torch.Generator().manual_seed(k), dtype=dtype)
        check_block_equivalence(block, x, dtype)


@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_block_equivalence_in_ne_out(k, stride, groups):
    c_in, c_out = 4, 8
    g = c_in if groups == "dw" else groups
    for dtype in (torch.float64, torch.float32):
        block = DiverseBranchBlock(c_in, c_out, k, stride, k // 2, g, dtype=dtype)
        assert set(block.branch_names) == expected_branches(c_in, c_out, k, stride, k // 2)
        assert "identity" not in block.branch_names
        randomize(block, seed=k + stride + g)
        x = torch.randn(2, c_in, 9, 9, generator=torch.Generator().manual_seed(1), dtype=dtype)
        check_block_equivalence(block, x, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_grown_block_with_and_without_conv_bias_equals_its_conv(k, bias, dtype):
    """Blocks made by grow (kxk branch reusing the user's conv, bias moved to the BN) stay foldable."""
    model = nn.Sequential(nn.Conv2d(4, 4, k, 1, k // 2, bias=bias, dtype=dtype))
    block = grow_conv(model, "0", seed=k)
    assert isinstance(model[0], DiverseBranchBlock) and model[0] is block
    assert block.dyrep_orig_bias is bias
    assert block.kxk_branch.conv.bias is None
    randomize(block, seed=k + 17 * bias)
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(2), dtype=dtype)
    check_block_equivalence(block, x, dtype)


@pytest.mark.parametrize("c_in,c_out,k,stride,padding", [
    (4, 4, 3, 1, 1), (4, 4, 3, 2, 1), (4, 6, 3, 1, 1), (4, 4, 3, 1, 0), (4, 4, 5, 1, 3),
    (4, 4, 3, 2, 0), (8, 8, 7, 1, 3), (8, 4, 5, 2, 2),
])
def test_allowed_branches_rules(c_in, c_out, k, stride, padding):
    got = allowed_branches(c_in, c_out, k, stride, padding)
    assert set(got) == expected_branches(c_in, c_out, k, stride, padding)
    # canonical order
    assert list(got) == [n for n in BRANCH_NAMES if n in got]


def test_allowed_branches_explicit_table():
    assert set(allowed_branches(4, 4, 3, 1, 1)) == ALL
    assert set(allowed_branches(4, 4, 3, 2, 1)) == ALL - {"identity"}
    assert set(allowed_branches(4, 8, 3, 1, 1)) == ALL - {"identity"}
    assert set(allowed_branches(4, 4, 3, 1, 0)) == {"1x1_kxk", "1x1_avg", "kxk"}
    assert set(allowed_branches(4, 4, 5, 1, 3)) == {"1x1_kxk", "1x1_avg", "kxk"}


def test_block_constructor_validates_branches():
    with pytest.raises(ValueError):
        DiverseBranchBlock(4, 4, 3, 1, 0, branches=["kxk", "1x1"])  # 1x1 needs centred padding
    with pytest.raises(ValueError):
        DiverseBranchBlock(4, 4, 3, 2, 1, branches=["kxk", "identity"])  # stride 2
    with pytest.raises(ValueError):
        DiverseBranchBlock(4, 6, 3, 1, 1, branches=["kxk", "identity"])  # in != out
    with pytest.raises(ValueError):
        DiverseBranchBlock(4, 4, 3, 1, 1, branches=["1x1", "identity"])  # no kxk
    block = DiverseBranchBlock(4, 4, 3, 1, 1, branches=["identity", "kxk", "1x1"])
    assert block.branch_names == ["1x1", "kxk", "identity"]  # canonical order


def reference_forward(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward of a block written from the branch definitions with functional ops only."""
    k, s, p, g = block.kernel_size, block.stride, block.padding, block.groups

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)

    def bn_pad_with_bias(m, t):
        y = bn(m, t)
        shift = (m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)).reshape(1, -1, 1, 1)
        return F.pad(y - shift, [p] * 4) + shift

    total = 0
    for name, br in block.branches.items():
        if name == "kxk":
            y = bn(br.bn, F.conv2d(x, br.conv.weight, br.conv.bias, s, p, groups=g))
        elif name == "1x1":
            y = bn(br.bn, F.conv2d(x, br.conv.weight, None, s, 0, groups=g))
        elif name == "1xk":
            y = bn(br.bn, F.conv2d(x, br.conv.weight, None, s, (0, p), groups=g))
        elif name == "kx1":
            y = bn(br.bn, F.conv2d(x, br.conv.weight, None, s, (p, 0), groups=g))
        elif name == "identity":
            y = bn(br.bn, x)
        elif name == "1x1_kxk":
            mid = bn_pad_with_bias(br.bn1.bn, F.conv2d(x, br.conv1.weight, None, groups=g))
            y = bn(br.bn, F.conv2d(mid, br.conv2.weight, None, s, 0, groups=g))
        elif name == "1x1_avg" and g >= block.out_channels:  # depthwise: no 1x1 conv, zero-padded pool
            y = bn(br.bn, F.avg_pool2d(F.pad(x, [p] * 4), k, s, 0))
        elif name == "1x1_avg":
            mid = bn_pad_with_bias(br.bn1.bn, F.conv2d(x, br.conv1.weight, None, groups=g))
            y = bn(br.bn, F.avg_pool2d(mid, k, s, 0))
        else:
            raise AssertionError(name)
        total = total + y
    return total


@pytest.mark.parametrize("k,stride,padding,groups", [(3, 1, 1, 1), (5, 2, 2, 2), (3, 1, 0, 4), (7, 1, 3, 4)])
def test_block_forward_is_sum_of_documented_branches(k, stride, padding, groups):
    block = DiverseBranchBlock(4, 4, k, stride, padding, groups, dtype=torch.float64)
    randomize(block, seed=5)
    block.eval()
    x = torch.randn(2, 4, 11, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(block(x), reference_forward(block, x)) <= 1e-12
        # The output has the geometry of a plain conv with the same hyper-parameters.
        plain = nn.Conv2d(4, 4, k, stride, padding, groups=groups, dtype=torch.float64)
        assert block(x).shape == plain(x).shape


def test_block_train_mode_forward_backward_reaches_every_branch():
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=1)
    block.train()
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


CUT_MODES = ["reset", "absorb"]


@pytest.mark.parametrize("mode", CUT_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("to_cut", [["1x1"], ["identity", "1x1_avg"], ["1x1_kxk", "1xk", "kx1"],
                                    ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity"]])
def test_cut_preserves_eval_function(to_cut, dtype, mode):
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=dtype)
    randomize(block, seed=len(to_cut))
    block.eval()
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(4), dtype=dtype)
    with torch.no_grad():
        before = block(x)
        block.cut(to_cut, mode=mode)
        after = block(x)
    assert set(block.branch_names) == ALL - set(to_cut)
    assert rel_err(after, before) <= TOL[dtype]
    check_block_equivalence(block, x, dtype)


def test_reset_cut_keeps_survivors_and_resets_kxk_bn():
    """The original's cut: surviving branches untouched; kxk BN gamma=1 and fresh stats (its beta
    carries the residual bias); the kxk kernel holds fused block - sum(remaining) exactly."""
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=21)
    block.eval()
    survivors = ["1x1_kxk", "1xk", "identity"]
    kept = {n: {k: v.clone() for k, v in block.branches[n].state_dict().items()} for n in survivors}
    with torch.no_grad():
        target_k, _ = block.equivalent_kernel()
        block.cut(["1x1", "1x1_avg", "kx1"])
    for n in survivors:
        now = block.branches[n].state_dict()
        assert all(torch.equal(now[k], v) for k, v in kept[n].items()), n
    bn = block.kxk_branch.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and int(bn.num_batches_tracked) == 0
    with torch.no_grad():
        rest_k = sum(block.branch_kernel(n)[0] for n in survivors)
        kxk_k, _ = block.branch_kernel("kxk")
    assert rel_err(kxk_k, target_k - rest_k) <= 1e-12


def test_absorb_cut_keeps_kxk_statistics():
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=22)
    stats = (block.kxk_branch.bn.running_mean.clone(), block.kxk_branch.bn.weight.detach().clone())
    block.cut(["1x1"], mode="absorb")
    assert torch.equal(block.kxk_branch.bn.running_mean, stats[0])
    assert torch.equal(block.kxk_branch.bn.weight, stats[1])


def test_cut_kxk_or_unknown_mode_is_refused():
    block = DiverseBranchBlock(4, 4, 3, 1, 1)
    with pytest.raises(ValueError):
        block.cut(["kxk"])
    with pytest.raises(ValueError):
        block.cut(["1x1"], mode="fold")
    with pytest.raises(ValueError):
        block.cut(["1x1", "nope"])
    assert set(block.branch_names) == ALL  # nothing half-cut


def test_absorb_into_zero_scale_kxk_bn_is_refused_reset_is_not():
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=23)
    with torch.no_grad():
        block.kxk_branch.bn.weight[1] = 0.0
    with pytest.raises(ValueError):
        block.cut(["1x1"], mode="absorb")
    block.eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        before = block(x)
        block.cut(["1x1"], mode="reset")  # the kxk BN is reset, so a zero gamma is no obstacle
        assert rel_err(block(x), before) <= 1e-10


@pytest.mark.parametrize("mode", CUT_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nested_block_in_kxk_slot_equivalence_and_cut(dtype, mode):
    inner = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=dtype)
    outer = DiverseBranchBlock(4, 4, 3, 1, 1, kxk_conv=inner, dtype=dtype)
    assert outer.kxk_branch.conv is inner
    randomize(outer, seed=9)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    check_block_equivalence(outer, x, dtype)
    inner_1x1_gamma = inner.branches["1x1"].bn.weight.detach().clone()
    with torch.no_grad():
        before = outer(x)
        outer.cut(["1x1", "identity", "1x1_kxk"], mode=mode, seed=3, init_gamma=0.01)
        assert rel_err(outer(x), before) <= TOL[dtype]
    assert set(inner.branch_names) == ALL  # the nested block keeps its branches
    if mode == "absorb":
        assert torch.equal(inner.branches["1x1"].bn.weight, inner_1x1_gamma)
    else:  # reset: the nested block's branches are re-initialised (last BN gamma = init_gamma, fresh stats)
        for name, branch in inner.branches.items():
            if name != "kxk":
                assert torch.equal(branch.bn.weight, torch.full_like(branch.bn.weight, 0.01)), name
                assert torch.equal(branch.bn.running_mean, torch.zeros_like(branch.bn.running_mean)), name
    check_block_equivalence(outer, x, dtype)


def test_reset_cut_with_nested_kxk_is_seeded():
    def build():
        inner = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
        outer = DiverseBranchBlock(4, 4, 3, 1, 1, kxk_conv=inner, dtype=torch.float64)
        randomize(outer, seed=11)
        return outer

    a, b, c = build(), build(), build()
    a.cut(["1x1"], seed=5)
    b.cut(["1x1"], seed=5)
    c.cut(["1x1"], seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_branch_importance_by_hand():
    block = DiverseBranchBlock(4, 4, 3, 1, 1)
    with torch.no_grad():
        block.kxk_branch.bn.weight.copy_(torch.tensor([1.0, -3.0, 2.0, -2.0]))  # mean |g| = 2
        block.branches["1x1"].bn.weight.copy_(torch.tensor([0.1, -0.1, 0.3, 0.3]))  # 0.2 -> 0.1
        block.branches["identity"].bn.weight.copy_(torch.tensor([-4.0, 4.0, 4.0, 4.0]))  # 4 -> 2
    imp = {n: float(v) for n, v in block.branch_importance().items()}
    assert imp["kxk"] == pytest.approx(1.0)
    assert imp["1x1"] == pytest.approx(0.1)
    assert imp["identity"] == pytest.approx(2.0)
    assert set(imp) == set(block.branch_names)


def test_describe_is_json_and_rebuilds_same_block():
    block = DiverseBranchBlock(4, 8, 5, 2, 2, groups=2, branches=["kxk", "1x1_avg", "1xk"], orig_bias=True)
    d = json.loads(json.dumps(block.describe()))
    assert d == {"in_channels": 4, "out_channels": 8, "kernel_size": 5, "stride": 2, "padding": 2, "groups": 2,
                 "branches": ["1x1_avg", "kxk", "1xk"], "orig_bias": True}
    rebuilt = DiverseBranchBlock(d["in_channels"], d["out_channels"], d["kernel_size"], d["stride"], d["padding"],
                                 d["groups"], branches=d["branches"], orig_bias=d["orig_bias"])
    assert list(rebuilt.state_dict()) == list(block.state_dict())
    assert all(rebuilt.state_dict()[n].shape == t.shape for n, t in block.state_dict().items())


@pytest.mark.parametrize("c_in,c_out,groups", [(4, 4, 1), (4, 8, 2), (4, 4, 4), (4, 8, 4)])
def test_1x1_kxk_bottleneck_width_is_in_channels(c_in, c_out, groups):
    """The original DyRep's DBB: mid = in_channels, depthwise included (not doubled)."""
    block = DiverseBranchBlock(c_in, c_out, 3, 1, 1, groups)
    br = block.branches["1x1_kxk"]
    assert br.conv1.out_channels == c_in and br.conv2.in_channels == c_in
    assert br.conv1.groups == br.conv2.groups == groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 1, 0), (3, 1, 2)])
def test_depthwise_1x1_avg_branch_has_no_conv_and_stays_exact(k, stride, padding, dtype):
    """groups >= out_channels: the 1x1_avg branch is zero-padded avg-pool (count_include_pad) -> BN."""
    block = DiverseBranchBlock(6, 6, k, stride, padding, groups=6, dtype=dtype)
    avg = block.branches["1x1_avg"]
    assert not any(isinstance(m, nn.Conv2d) for m in avg.modules())
    assert isinstance(avg.bn, nn.BatchNorm2d)
    randomize(block, seed=k + stride + padding)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(7), dtype=dtype)
    check_block_equivalence(block, x, dtype)
    with torch.no_grad():  # the branch alone: avg-pool over the zero-padded input, then BN
        bn = avg.bn
        pooled = F.avg_pool2d(F.pad(x, [padding] * 4), k, stride, 0)
        ref = F.batch_norm(pooled, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        assert rel_err(avg.eval()(x), ref) <= TOL[dtype]
    grouped = DiverseBranchBlock(6, 12, k, stride, padding, groups=6)  # groups < out: keeps its 1x1 conv
    assert any(isinstance(m, nn.Conv2d) for m in grouped.branches["1x1_avg"].modules())


# ---------------------------------------------------------------------------
# The fused train-mode fast path (rep/dbb_fused.py) and the branch table
# ---------------------------------------------------------------------------
def test_branch_table_covers_every_branch_name():
    from dyrep_ray.rep.dbb_branches import BRANCH_BUILDERS

    assert set(BRANCH_BUILDERS) == ALL
    block = DiverseBranchBlock(4, 4, 3, 1, 1)
    assert block.branches["1xk"].conv.kernel_size == (1, 3) and block.branches["1xk"].conv.padding == (0, 1)
    assert block.branches["kx1"].conv.kernel_size == (3, 1) and block.branches["kx1"].conv.padding == (1, 0)


def _train_pair(seed: int):
    block = DiverseBranchBlock(4, 4, 3, 1, 1, dtype=torch.float64)
    randomize(block, seed=seed)
    block.train()
    reference = copy.deepcopy(block)
    return block, reference


def test_fused_path_equals_branch_path_in_train_mode():
    from dyrep_ray.rep import dbb_fused

    block, reference = _train_pair(31)
    assert dbb_fused.fusable(block)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_fast, y_ref = block(x), reference._forward_branches(x)
    assert rel_err(y_fast.detach(), y_ref.detach()) <= 1e-12
    y_fast.square().sum().backward()
    y_ref.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in block.named_parameters():
        assert rel_err(p.grad, grads[name].grad) <= 1e-10, name
    ref_state = reference.state_dict()
    for name, t in block.state_dict().items():  # BN running stats updated identically
        assert torch.allclose(t, ref_state[name], rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_global_module_hook_sees_every_branch_and_result_unchanged(kind):
    """A global hook (torch.nn.modules.module.register_module_*_hook) must observe the branch convs:
    the block then leaves the fast path, and its output is still the per-branch sum."""
    from torch.nn.modules import module as torch_module

    from dyrep_ray.rep import dbb_fused

    block, reference = _train_pair(32)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen: list[nn.Module] = []
    register = (torch_module.register_module_forward_hook if kind == "forward"
                else torch_module.register_module_forward_pre_hook)
    handle = register(lambda m, *args: seen.append(m))
    try:
        assert not dbb_fused.fusable(block)
        y = block(x)
    finally:
        handle.remove()
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert all(any(s is c for s in seen) for c in convs)  # every branch conv ran as a module
    assert rel_err(y.detach(), reference._forward_branches(x).detach()) <= 1e-12
    assert dbb_fused.fusable(block)  # hook removed: back on the fast path
