"""timm conventions: a DyRep-grown ``timm/<name>`` model deploys to weights that load with ``strict=True`` into
``timm.create_model(name, num_classes=...)``, and evaluate the same through timm's own data pipeline
(``resolve_data_config`` + ``create_transform``, as timm's ``validate.py`` does); ``timm.utils.reparameterize_model``
folds every block of every registered type (nested ones included) into a conv with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from timm.utils import reparameterize_model

from dyrep_ray.models import build_model
from dyrep_ray.rep import deploy
from dyrep_ray.rep.blocks import BLOCK_TYPE_NAMES, block_class, is_block
from dyrep_ray.rep.dbb import DiverseBranchBlock
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.paths import eligible_convs, iter_blocks
from tests.helpers import randomize_bn

NAME, NUM_CLASSES = "resnet10t", 7
ATOL, RTOL = 1e-4, 1e-4  # float32 through a 10-layer net, logits of order 1


@pytest.fixture(scope="module")
def grown():
    torch.manual_seed(0)
    model = build_model(f"timm/{NAME}", NUM_CLASSES)
    convs = [name for name, _ in eligible_convs(model)]
    for i, path in enumerate(convs[1:4]):  # three convs grown (the stem's first conv excluded)
        grow_conv(model, path, seed=i)
    nested = next(n for n, _ in eligible_convs(model) if "branches.kxk" in n)
    grow_conv(model, nested, seed=9)  # and one nested block
    randomize_bn(model, seed=3)
    return model.eval()


def _images(n: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_deployed_weights_load_strictly_into_timm_create_model_and_validate_alike(grown, tmp_path):
    assert sum(isinstance(m, DiverseBranchBlock) for m in grown.modules()) == 4
    path = tmp_path / "deployed.safetensors"
    save_file({k: v.contiguous() for k, v in deploy(grown).state_dict().items()}, str(path))
    target = timm.create_model(NAME, pretrained=False, num_classes=NUM_CLASSES)
    target.load_state_dict(load_file(str(path)), strict=True)
    target.eval()
    # validate.py-style evaluation: timm resolves the data config from the model and builds its eval transform
    config = resolve_data_config({}, model=target)
    transform = create_transform(**config, is_training=False)
    batch = torch.stack([transform(img) for img in _images(4)])
    with torch.no_grad():
        expected, got = grown(batch), target(batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(got.argmax(1), expected.argmax(1))


# float32 through a 10-layer net with grown blocks: differences of order 1e-6 relative to logits of order 1
FOLD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (ATOL, RTOL)}  # (atol, rtol)


def _grown_of_type(block_type: str, dtype: torch.dtype) -> torch.nn.Module:
    """``timm/resnet10t`` with three convs grown into ``block_type`` blocks, one nested in a kxk slot and one in a
    1x1_kxk slot, every block parameter and BN statistic moved away from its grown value (a trained model)."""
    torch.manual_seed(0)
    model = build_model(f"timm/{NAME}", NUM_CLASSES).to(dtype)
    convs = [name for name, _ in eligible_convs(model, block_type=block_type)]
    for i, path in enumerate(convs[1:4]):  # the stem's first conv excluded
        grow_conv(model, path, seed=i, block_type=block_type)
    for slot, seed in (("branches.kxk.conv", 9), ("branches.1x1_kxk.conv2", 10)):
        nested = next(n for n, _ in eligible_convs(model, block_type=block_type) if n.endswith(slot))
        grow_conv(model, nested, seed=seed, block_type=block_type)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, block in iter_blocks(model):
            for param in block.parameters(recurse=False):
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64).to(dtype))
            for name in block.branch_names:
                gate = block.branch_gate(name)
                gate.add_(0.1 * torch.rand(gate.shape, generator=gen, dtype=torch.float64).to(dtype))
        randomize_bn(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_type", BLOCK_TYPE_NAMES)  # every registered type, a new one included
def test_timm_reparameterize_model_folds_every_block(block_type, dtype, monkeypatch):
    model = _grown_of_type(block_type, dtype)
    grown = iter_blocks(model)
    assert len(grown) == 5 and all(b.block_type == block_type for _, b in grown)
    top_level = [p for p, _ in grown if not any(p.startswith(q + ".") for q, _ in grown)]
    folded_blocks: set[int] = set()
    cls = block_class(block_type)
    fuse = cls.fuse

    def counting_fuse(self):
        folded_blocks.add(id(self))
        return fuse(self)

    monkeypatch.setattr(cls, "fuse", counting_fuse)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        before = model(x)
        folded = reparameterize_model(model)  # timm's own function (copies the model by default)
        after = folded(x)
    assert not any(is_block(m) for m in folded.modules())  # blocks left: 0
    assert len(folded_blocks) == len(grown)  # every block, nested ones included, folded by timm
    assert all(type(folded.get_submodule(p)) is torch.nn.Conv2d for p in top_level)
    assert len(iter_blocks(model)) == len(grown)  # the original is untouched
    atol, rtol = FOLD_TOL[dtype]
    torch.testing.assert_close(after, before, atol=atol, rtol=rtol)
    plain = build_model(f"timm/{NAME}", NUM_CLASSES)
    n_bias = sum(m.out_channels for m in folded.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in plain.parameters()) + n_bias