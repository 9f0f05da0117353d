"""DyRep on every supported model family: grow -> cut -> deploy is exact and loads into the untouched model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dyrep_ray.models import build_model, count_params
from dyrep_ray.rep import DyRep, deploy
from dyrep_ray.rep.dbb import DiverseBranchBlock

MODELS = ["small_cnn", "vgg16_cifar", "resnet18", "resnet34", "resnet50", "mobilenet_v1", "timm/repvgg_a2",
          "timm/repvgg_b2g4", "timm/repvgg_b3"]
REL_TOL_F64 = 1e-10


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_grow_cut_deploy_exact_on_model(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build_model(name, 10).double().eval()
    _randomize_bn(model, gen)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=gen)
    reference = model(x)
    dyrep = DyRep(model, seed=3)
    eligible = dyrep.eligible_names
    assert eligible, f"{name}: no eligible convs"
    targets = [eligible[0], eligible[len(eligible) // 2], eligible[-1]]
    for path in dict.fromkeys(targets):
        dyrep.grow(path)
    blocks = [m for m in model.modules() if isinstance(m, DiverseBranchBlock)]
    assert len(blocks) == len(dict.fromkeys(targets))
    _randomize_bn(model, gen)  # trained-looking statistics in every branch
    grown_out = model(x)
    # cut two branches of the first block: function preserved
    first = blocks[0]
    dyrep.cut(targets[0], [n for n in first.branch_names if n != "kxk"][:2])
    cut_out = model(x)
    scale = grown_out.abs().max()
    assert (cut_out - grown_out).abs().max() / scale <= REL_TOL_F64
    deployed = deploy(model)
    assert not any(isinstance(m, DiverseBranchBlock) for m in deployed.modules())
    # the untouched architecture, built on the meta device (no second init of a 100M-parameter model); strict
    # loading checks every key and shape, assign=True puts the deployed tensors in
    with torch.device("meta"):
        untouched = build_model(name, 10).double().eval()
    untouched.load_state_dict(deployed.state_dict(), strict=True, assign=True)
    assert count_params(untouched) == count_params(deployed)
    assert (untouched(x) - cut_out).abs().max() / scale <= REL_TOL_F64
    assert reference.shape == cut_out.shape == (2, 10)
