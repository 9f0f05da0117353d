"""timm conventions: a DyRep-grown ``timm/<name>`` model deploys to weights that load with ``strict=True`` into
``timm.create_model(name, num_classes=...)``, and evaluate the same through timm's own data pipeline
(``resolve_data_config`` + ``create_transform``, as timm's ``validate.py`` does); ``timm.utils.reparameterize_model``
folds every block in place with the same outputs."""

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
from dyrep_ray.rep.dbb import DiverseBranchBlock
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.paths import eligible_convs
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


def test_timm_reparameterize_model_folds_every_block(grown):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = grown(x)
    folded = reparameterize_model(grown)  # timm's own function (copies the model by default)
    with torch.no_grad():
        after = folded(x)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=RTOL)
    blocks = [m for m in folded.modules() if isinstance(m, DiverseBranchBlock)]
    # timm's function calls ``fuse()`` where a module has it: the blocks are replaced by convs, or (through
    # ``reparameterize()``) folded in place; either way no branch is left to run.
    assert all(b.is_fused and len(b.branches) == 0 for b in blocks), [b.branch_names for b in blocks]
    plain = build_model(f"timm/{NAME}", NUM_CLASSES)
    n_bias = sum(m.out_channels for m in folded.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in plain.parameters()) + n_bias
