"""Model-level grow -> cut -> deploy on a VGG-style net, torchvision ResNet-18 and a tiny MobileNet.

The deployed state_dict must load with ``strict=True`` into a freshly built, untouched model of
the same architecture and reproduce the DyRep model's eval outputs (float64 1e-10 relative,
float32 1e-5 relative).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dyrep_ray.rep import (
    DeployError,
    DiverseBranchBlock,
    DyRep,
    deploy,
    max_output_difference,
    param_groups_for,
    recalibrate_bn,
)
from dyrep_ray.rep.blocks import BLOCK_TYPE_NAMES
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.paths import iter_blocks
from tests.helpers import rel_err as _rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return _rel_err(actual.detach(), expected.detach())


@torch.no_grad()
def randomize_bns(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 0.5 + 0.75)
            m.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
def vgg_net(num_classes=10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),  # user conv with a bias
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


class ConvBNReLU(nn.Module):
    def __init__(self, c_in, c_out, k, stride, groups):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TinyMobileNet(nn.Module):
    """Stem conv3x3/2, three depthwise-separable blocks (one with a stride-2 depthwise conv)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBNReLU(3, 8, 3, 2, 1)
        cfg = [(8, 16, 1), (16, 32, 2), (32, 32, 1)]
        self.blocks = nn.ModuleList()
        for c_in, c_out, s in cfg:
            self.blocks.append(nn.Sequential(ConvBNReLU(c_in, c_in, 3, s, c_in), ConvBNReLU(c_in, c_out, 1, 1, 1)))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18():
    return torchvision.models.resnet18(num_classes=10)


MODELS = {"vgg": vgg_net, "resnet18": resnet18, "mobilenet": TinyMobileNet}


def inputs(seed, dtype, n=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen, dtype=dtype), torch.randint(0, 10, (n,), generator=gen)


def dyrep_lifecycle(name: str, dtype, rounds=2, topk=2):
    """Build, grow (metric-driven, several rounds with training), nest, cut, collapse. Returns (base, model)."""
    torch.manual_seed(0)
    base = MODELS[name]().to(dtype)
    randomize_bns(base, 1)
    model = copy.deepcopy(base)
    d = DyRep(model, grow_topk=topk, seed=3)
    opt = torch.optim.SGD(param_groups_for(model, 1e-4), lr=0.01, momentum=0.9)
    recal_batches = [inputs(100 + i, dtype)[0] for i in range(2)]

    def recal(m, bns):
        recalibrate_bn(m, recal_batches, bns, num_iters=2)

    for r in range(rounds):
        model.train()
        for t in range(2):
            x, y = inputs(10 * r + t, dtype)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            d.record_metrics()
            opt.step()
        events = d.apply(d.plan(), opt, recal_fn=recal)
        assert sum(e.op == "grow" for e in events) == topk
    assert any(isinstance(m, DiverseBranchBlock) for m in model.modules())
    top_level = [n for n in d.eligible_names if ".branches." not in n]
    while len([p for p, _ in iter_blocks(model) if ".branches." not in p]) < 3:  # metric may prefer nesting
        d.grow(top_level.pop(0), recal_fn=recal, optimizer=opt)
    blocks = [p for p, _ in iter_blocks(model) if ".branches." not in p]
    # a nested growth inside a block's kxk slot (unless the metric already chose one)
    hosts = [p for p in blocks if isinstance(model.get_submodule(p).kxk_branch.conv, DiverseBranchBlock)]
    if not hosts:
        d.grow(f"{blocks[0]}.branches.kxk.conv", recal_fn=recal, optimizer=opt)
        hosts = [blocks[0]]
    host = hosts[0]
    other = next(p for p in blocks if p != host)
    # partial cut of the host (absorbed by the nested block), collapse of another block
    d.cut(host, [n for n in model.get_submodule(host).branch_names if n != "kxk"][:2], optimizer=opt)
    d.cut(other, [n for n in model.get_submodule(other).branch_names if n != "kxk"], optimizer=opt)
    assert type(model.get_submodule(other)) is nn.Conv2d
    randomize_bns(model, 2)  # every BN (new ones included) gets non-trivial eval statistics
    return base, model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_grow_cut_deploy_loads_into_untouched_model(name, dtype):
    base, model = dyrep_lifecycle(name, dtype)
    x, _ = inputs(7, dtype, n=3)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m)) for n, m in model.named_modules()]

    deployed = deploy(model)  # inplace=False
    assert deployed is not model
    assert not any(isinstance(m, DiverseBranchBlock) for m in deployed.modules())

    # the DyRep model is untouched
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert list(model.state_dict()) == list(snapshot)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), expected)

    # same layout as the user's architecture: every conv, same bias presence
    for path, conv in base.named_modules():
        if isinstance(conv, nn.Conv2d):
            dep = deployed.get_submodule(path)
            assert type(dep) is nn.Conv2d, path
            assert (dep.bias is None) == (conv.bias is None), path

    torch.manual_seed(1234)
    fresh = MODELS[name]().to(dtype)  # untouched, other weights
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    assert count_params(fresh) == count_params(base) == count_params(deployed)
    fresh.eval()
    deployed.eval()
    with torch.no_grad():
        err_fresh = rel_err(fresh(x), expected)
        err_dep = rel_err(deployed(x), expected)
    assert err_fresh <= TOL[dtype], f"{name}: fresh model vs DyRep model rel err {err_fresh:.3g}"
    assert err_dep <= TOL[dtype], f"{name}: deployed vs DyRep model rel err {err_dep:.3g}"
    # the comparison is meaningful: the trained/grown model differs from the untouched base
    base.eval()
    with torch.no_grad():
        assert rel_err(base(x), expected) > 1e-3


def test_deploy_inplace_and_training_flag():
    torch.manual_seed(0)
    model = vgg_net().double()
    randomize_bns(model, 3)
    grow_conv(model, "0", seed=1)
    grow_conv(model, "7", seed=2)
    randomize_bns(model, 4)
    x, _ = inputs(1, torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    out = deploy(model, inplace=True)
    assert out is model and out.training and all(m.training for m in out.modules())
    assert type(model[0]) is nn.Conv2d and model[0].bias is None  # bias folded into BN 1
    assert not hasattr(model[0], "dyrep_orig_bias")
    assert rel_err(out.eval()(x), expected) <= 1e-10


def bias_free_conv_relu_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.ReLU(),
    ).double()


def test_deploy_error_when_gained_bias_has_no_following_bn():
    model = bias_free_conv_relu_net()
    grow_conv(model, "0", seed=1)
    randomize_bns(model, 5)
    with pytest.raises(DeployError, match="'0'"):
        deploy(model)
    # keep_bias=True: deploys, output identical, loads into the architecture with a bias at '0'
    x, _ = inputs(2, torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    dep = deploy(model, keep_bias=True)
    assert dep[0].bias is not None
    assert rel_err(dep.eval()(x), expected) <= 1e-10
    untouched = bias_free_conv_relu_net()
    with pytest.raises(RuntimeError):
        untouched.load_state_dict(dep.state_dict(), strict=True)
    with_bias = bias_free_conv_relu_net()
    with_bias[0] = nn.Conv2d(3, 8, 3, padding=1, bias=True).double()
    with_bias.load_state_dict(dep.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(with_bias.eval()(x), expected) <= 1e-10


def test_deploy_bias_rules_other_convs():
    """Conv -> BN folds the gained bias; a conv that had a bias keeps it even before a ReLU."""
    model = bias_free_conv_relu_net()
    grow_conv(model, "2", seed=1)
    grow_conv(model, "5", seed=2)
    randomize_bns(model, 6)
    x, _ = inputs(3, torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    dep = deploy(model)
    assert dep[2].bias is None and dep[5].bias is not None
    fresh = bias_free_conv_relu_net()
    fresh.load_state_dict(dep.state_dict(), strict=True)
    assert rel_err(fresh.eval()(x), expected) <= 1e-10


def test_deploy_error_for_collapsed_conv_before_relu():
    model = bias_free_conv_relu_net()
    d = DyRep(model)
    d.grow("0")
    d.cut("0", [n for n in model[0].branch_names if n != "kxk"])
    assert type(model[0]) is nn.Conv2d and model[0].bias is not None
    with pytest.raises(DeployError, match="'0'"):
        deploy(model)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, deploy falls back to module order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if float(x.sum()) > -1e30:
            x = self.bn2(self.head(x))
        return x


def test_deploy_untraceable_model_uses_module_order():
    import torch.fx as fx

    torch.manual_seed(0)
    model = Untraceable().double()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    grow_conv(model, "conv", seed=1)
    grow_conv(model, "head", seed=2)
    randomize_bns(model, 7)
    x, _ = inputs(4, torch.float64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    dep = deploy(model)
    fresh = Untraceable().double()
    fresh.load_state_dict(dep.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh.eval()(x), expected) <= 1e-10


def test_max_output_difference_restores_modes():
    torch.manual_seed(0)
    a = vgg_net().double()
    randomize_bns(a, 1)
    b = copy.deepcopy(a)
    grow_conv(b, "3", seed=0)
    a.train()
    b.eval()
    x, _ = inputs(5, torch.float64)
    diff = max_output_difference(a, b, x)
    with torch.no_grad():
        assert 0 <= diff <= 1e-10 * float(a.eval()(x).abs().max())
    a.train()
    assert max_output_difference(a, b, x) == diff
    assert a.training and not b.training
    with torch.no_grad():
        b[3].branches["1x1"].bn.bias.add_(1.0)
    assert max_output_difference(a, b, x) > 1e-3


def test_deploy_bare_block_returns_conv():
    block = DiverseBranchBlock(4, 4, 3, dtype=torch.float64)
    randomize_bns(block, 1)
    block.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
    out = deploy(block, keep_bias=True)
    assert type(out) is nn.Conv2d
    assert rel_err(out(x), expected) <= 1e-10
    assert math.isfinite(rel_err(out(x), expected))


# ---------------------------------------------------------------------------
# timm's re-parameterization contract
# ---------------------------------------------------------------------------
def timm_grown_model(dtype):
    """A grown VGG-style net with a nested block in a kxk slot and one in a 1x1_kxk slot."""
    torch.manual_seed(3)
    model = vgg_net().to(dtype)
    d = DyRep(model)
    for path in list(d.eligible_names)[:3]:
        d.grow(path)
    first = iter_blocks(model)[0][0]
    d.grow(f"{first}.branches.kxk.conv")
    d.grow(f"{first}.branches.1x1_kxk.conv2")
    randomize_bns(model, 17)
    assert len(iter_blocks(model)) == 5
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_reparameterize_in_place(dtype):
    """The other timm contract (``m.reparameterize()`` returns nothing): the block folds itself."""
    model = timm_grown_model(dtype).eval()
    x = torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        blocks = [m for _, m in iter_blocks(model)]
        for block in reversed(blocks):  # innermost first, as a module walk that folds children would
            assert block.reparameterize() is None
        after = model(x)
    assert all(b.is_fused and not b.branch_names for b in blocks[:1])
    assert rel_err(after, before) <= TOL[dtype]
    deployed = deploy(model, keep_bias=True)
    assert not any(isinstance(m, DiverseBranchBlock) for m in deployed.modules())
    with torch.no_grad():
        assert rel_err(deployed(x), before) <= TOL[dtype]
    with pytest.raises(ValueError):
        blocks[0].describe()


@pytest.mark.parametrize("block_type", BLOCK_TYPE_NAMES)
def test_reparameterize_means_the_same_on_every_block_type(block_type):
    """``reparameterize()`` folds in place and returns nothing, ``fuse()`` returns the replacing conv and leaves
    the block as it was: on every registered type, with the user's bias layout kept by both."""
    torch.manual_seed(5)
    model = vgg_net().double().eval()
    d = DyRep(model, block_type=block_type)
    for path in d.eligible_names[:2]:
        d.grow(path)
    d.grow(f"{iter_blocks(model)[0][0]}.branches.kxk.conv")
    randomize_bns(model, 18)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    blocks = [b for _, b in iter_blocks(model)]
    assert len(blocks) == 3
    with torch.no_grad():
        before = model(x)
        fused = [b.fuse() for b in blocks]
        assert all(type(c) is nn.Conv2d and not b.is_fused and b.branch_names for b, c in zip(blocks, fused))
        for block in reversed(blocks):  # innermost first
            assert block.reparameterize() is None
        after = model(x)
    assert all(b.is_fused and not b.branch_names for b in blocks)
    assert rel_err(after, before) <= TOL[torch.float64]
    with torch.no_grad():
        assert rel_err(deploy(model)(x), before) <= TOL[torch.float64]
        conv = blocks[0].to_conv()  # a folded block still converts, with the same bias layout as before
    assert (conv.bias is None) == (fused[0].bias is None)
    with pytest.raises(ValueError):
        blocks[0].describe()


class BrokenForward(nn.Module):
    """A model whose forward has a genuine bug (not a tracing limit): deploy must not hide it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        raise KeyError("bug in the user's forward")


def test_deploy_does_not_swallow_unexpected_trace_errors():
    model = BrokenForward()
    DyRep(model).grow("conv")
    with pytest.raises(KeyError, match="bug in the user's forward"):
        deploy(model)
