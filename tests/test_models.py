"""Model builders: every model builds and runs, parameter counts, errors, MAC counting."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn as nn

from dyrep_ray.models import (
    UnknownModelError,
    build_model,
    count_macs,
    count_params,
    default_input_size,
    list_models,
    register_model,
)
from dyrep_ray.models.vgg import VGG16_GROUPS, VGG_HIDDEN_FEATURES

BUILTIN_MODELS = ["small_cnn", "vgg16_cifar", "resnet18", "resnet34", "resnet50", "mobilenet_v1"]
TIMM_MODELS = ["timm/repvgg_a2", "timm/mobilenetv3_small_050"]
TINY_BATCH = 2
TINY_SIDE = 32


def test_list_models_holds_every_builtin():
    assert list_models() == sorted(BUILTIN_MODELS)


@pytest.mark.parametrize("name", BUILTIN_MODELS + TIMM_MODELS)
def test_forward_shape_on_tiny_input(name):
    num_classes = 7
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(TINY_BATCH, 3, TINY_SIDE, TINY_SIDE))
    assert out.shape == (TINY_BATCH, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("mobilenet_v1", 4_231_976),
    ],
)
def test_imagenet_param_counts_match_reference(name, expected):
    assert count_params(build_model(name, 1000)) == expected


def test_vgg16_cifar_param_count_by_hand():
    num_classes = 10
    expected = 0
    channels = 3
    for group in VGG16_GROUPS:
        for width in group:
            expected += 9 * channels * width + 2 * width  # conv3x3 (no bias) + BN affine
            channels = width
    expected += channels * VGG_HIDDEN_FEATURES + VGG_HIDDEN_FEATURES
    expected += VGG_HIDDEN_FEATURES * num_classes + num_classes
    model = build_model("vgg16_cifar", num_classes)
    assert count_params(model) == expected
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_vgg16_cifar_reaches_1x1_at_32():
    model = build_model("vgg16_cifar", 10).eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 512, 1, 1)


@pytest.mark.parametrize("name", ["small_cnn", "vgg16_cifar", "mobilenet_v1"])
def test_builtin_convs_are_plain_conv_followed_by_bn(name):
    model = build_model(name, 10)
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    assert convs
    for index in convs:
        conv = modules[index]
        assert type(conv) is nn.Conv2d and conv.bias is None
        assert isinstance(modules[index + 1], nn.BatchNorm2d)
        assert modules[index + 1].num_features == conv.out_channels


def test_small_cnn_shape():
    model = build_model("small_cnn", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert 5 <= len(convs) <= 6
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert count_params(model) < 200_000


def test_mobilenet_v1_structure():
    model = build_model("mobilenet_v1", 1000)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)
    assert [m.stride[0] for m in depthwise].count(2) == 4
    assert model.stem[0].stride == (2, 2) and model.stem[0].out_channels == 32
    assert model.fc.in_features == 1024


def test_resnet_keeps_torchvision_stem_at_small_inputs():
    model = build_model("resnet18", 10)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_drop_rate_keeps_state_dict_layout_and_pickles():
    plain = build_model("resnet18", 10)
    dropped = build_model("resnet18", 10, drop_rate=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict(), strict=True)
    restored = pickle.loads(pickle.dumps(dropped))
    restored.eval()
    dropped.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), dropped(x))
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_model("small_cnn", 10, drop_path_rate=0.1)


def test_unknown_model_error_names_closest_valid_one():
    with pytest.raises(UnknownModelError) as info:
        build_model("resnt18", 10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert "'resnt18'" in message
    assert "did you mean 'resnet18'" in message
    for name in BUILTIN_MODELS:
        assert name in message


def test_unknown_timm_model_error_is_one_line_with_suggestion():
    with pytest.raises(UnknownModelError) as info:
        build_model("timm/repvgg_a22", 10)
    message = str(info.value)
    assert "\n" not in message
    assert "repvgg_a2" in message and "did you mean" in message


def test_register_model_rejects_duplicates_and_reserved_prefix():
    with pytest.raises(ValueError, match="already registered"):

        @register_model("small_cnn")
        def other(num_classes: int) -> nn.Module:  # pragma: no cover - never built
            return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="reserved"):
        register_model("timm/x")(lambda num_classes: nn.Linear(1, num_classes))


def test_default_input_size():
    assert default_input_size("small_cnn") == 32
    assert default_input_size("vgg16_cifar") == 32
    assert default_input_size("resnet50") == 224
    assert default_input_size("mobilenet_v1") == 224
    assert default_input_size("timm/repvgg_a2") == 224
    with pytest.raises(UnknownModelError):
        default_input_size("vgg16")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.bn(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def test_count_macs_matches_hand_computation():
    model = _Tiny()
    # conv: 4x4x4 outputs x (3*3*3) ; grouped: 8x4x4 outputs x (4/2*3*3) ; fc: 5 outputs x 128 inputs
    expected = 4 * 4 * 4 * 27 + 8 * 4 * 4 * 18 + 5 * 128
    assert count_macs(model, input_size=(3, 8, 8)) == expected
    assert count_params(model) == (4 * 27 + 4) + 8 + 8 * 18 + (128 * 5 + 5)


def test_count_macs_restores_modes_and_follows_dtype():
    model = _Tiny().double()
    model.train()
    model.bn.eval()  # mixed modes must come back exactly
    running_mean = model.bn.running_mean.clone()
    macs = count_macs(model, input_size=(3, 8, 8))
    assert macs > 0
    assert model.training and model.conv.training and not model.bn.training
    torch.testing.assert_close(model.bn.running_mean, running_mean)  # eval forward: stats untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_count_macs_small_cnn_is_cheap():
    macs = count_macs(build_model("small_cnn", 10))
    assert 1_000_000 < macs < 50_000_000


# ---------------------------------------------------------------------------------------------------------------
# The original's TF-style init for vgg16_cifar and mobilenet_v1
# ---------------------------------------------------------------------------------------------------------------
STANDARD_ERRORS = 5  # a correct init fails a 5-sigma check with probability < 1e-6 per tensor
UNIFORM_EDGE_SAMPLES = 10  # max|w| of n uniform samples falls below bound*(1 - 10/n) with probability ~e^-10


def _check_tf_style_init(model: nn.Module) -> dict:
    checked = {"conv": 0, "depthwise": 0, "bn": 0, "linear": 0}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().double().flatten()
            n = w.numel()
            expected = math.sqrt(2.0 / (module.kernel_size[0] * module.kernel_size[1] * module.out_channels))
            # sample std of n normal draws has relative standard error 1/sqrt(2n); the mean has sigma/sqrt(n)
            assert abs(w.std().item() / expected - 1.0) < STANDARD_ERRORS / math.sqrt(2 * n), name
            assert abs(w.mean().item()) < STANDARD_ERRORS * expected / math.sqrt(n), name
            assert module.bias is None or not module.bias.any(), name
            checked["depthwise" if module.groups > 1 else "conv"] += 1
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert not module.bias.any(), name
            checked["bn"] += 1
        elif isinstance(module, nn.Linear):
            w = module.weight.detach().double()
            bound = 1.0 / math.sqrt(module.out_features)
            assert w.abs().max().item() <= bound, name
            assert w.abs().max().item() >= bound * (1.0 - UNIFORM_EDGE_SAMPLES / w.numel()), name
            # uniform on [-b, b]: std b/sqrt(3), its sample std has relative standard error ~ sqrt(0.8/(4n))
            assert abs(w.std().item() / (bound / math.sqrt(3.0)) - 1.0) < STANDARD_ERRORS * math.sqrt(0.2 / w.numel())
            assert not module.bias.any(), name
            checked["linear"] += 1
    return checked


def test_vgg16_cifar_uses_the_original_tf_style_init():
    torch.manual_seed(0)
    checked = _check_tf_style_init(build_model("vgg16_cifar", 10))
    assert checked == {"conv": 13, "depthwise": 0, "bn": 13, "linear": 2}


def test_mobilenet_v1_uses_the_original_tf_style_init_depthwise_included():
    torch.manual_seed(0)
    checked = _check_tf_style_init(build_model("mobilenet_v1", 1000))
    assert checked == {"conv": 14, "depthwise": 13, "bn": 27, "linear": 1}


def test_resnets_keep_torchvision_init():
    torch.manual_seed(0)
    fc = build_model("resnet18", 10).fc
    assert fc.bias.abs().max() > 0  # torchvision: PyTorch's default Linear init, bias not zeroed
    assert fc.weight.abs().max() <= 1.0 / math.sqrt(fc.in_features)
