"""Unit tests of the pure re-parameterization maths (``dyrep_ray.rep.transforms``).

Every reference is computed independently with ``F.conv2d`` / ``F.batch_norm`` /
``F.avg_pool2d`` on the un-fused computation; nothing is copied from the
implementation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyrep_ray.rep import transforms as T
from tests.helpers import rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rand_bn(c: int, gen: torch.Generator, dtype: torch.dtype):
    mean = torch.randn(c, generator=gen, dtype=dtype)
    var = torch.rand(c, generator=gen, dtype=dtype) * 2.0 + 0.1
    gamma = torch.randn(c, generator=gen, dtype=dtype)  # signed on purpose
    beta = torch.randn(c, generator=gen, dtype=dtype)
    return mean, var, gamma, beta


def channels_per_group(c_in: int, groups):
    return c_in if groups == "dw" else groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bn_scale_shift_matches_eval_batch_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    mean, var, gamma, beta = rand_bn(5, gen, dtype)
    x = torch.randn(3, 5, 4, 4, generator=gen, dtype=dtype)
    eps = 1e-3
    scale, shift = T.bn_scale_shift(mean, var, gamma, beta, eps)
    expected = F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)
    got = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    assert rel_err(got, expected) <= TOL[dtype]
    # affine=False BN: gamma/beta None mean 1/0
    scale, shift = T.bn_scale_shift(mean, var, None, None, eps)
    expected = F.batch_norm(x, mean, var, None, None, training=False, eps=eps)
    got = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    assert rel_err(got, expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_fuse_conv_bn_matches_conv_then_eval_bn(k, groups, conv_bias, dtype):
    gen = torch.Generator().manual_seed(k * 10 + conv_bias)
    c_in, c_out = 4, 4 if groups == "dw" else 6
    g = c_in if groups == "dw" else groups
    w = torch.randn(c_out, c_in // g, k, k, generator=gen, dtype=dtype)
    b = torch.randn(c_out, generator=gen, dtype=dtype) if conv_bias else None
    mean, var, gamma, beta = rand_bn(c_out, gen, dtype)
    eps = 1e-5
    x = torch.randn(2, c_in, 9, 9, generator=gen, dtype=dtype)

    expected = F.batch_norm(F.conv2d(x, w, b, padding=k // 2, groups=g), mean, var, gamma, beta,
                            training=False, eps=eps)
    fk, fb = T.fuse_conv_bn(w, b, mean, var, gamma, beta, eps)
    assert fk.shape == w.shape and fb.shape == (c_out,)
    got = F.conv2d(x, fk, fb, padding=k // 2, groups=g)
    assert rel_err(got, expected) <= TOL[dtype]
    # inputs untouched (pure function)
    assert fk.data_ptr() != w.data_ptr()


def test_fuse_conv_bn_detects_wrong_eps():
    """Sanity check that the comparison above is sensitive: a different eps must not pass."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
    mean, var, gamma, beta = rand_bn(3, gen, torch.float64)
    var = var * 0 + 1e-3  # small var makes eps matter
    x = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    expected = F.batch_norm(F.conv2d(x, w), mean, var, gamma, beta, training=False, eps=1e-5)
    fk, fb = T.fuse_conv_bn(w, None, mean, var, gamma, beta, 1e-3)
    assert rel_err(F.conv2d(x, fk, fb), expected) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("small,size", [((1, 1), 3), ((1, 1), 7), ((3, 3), 5), ((1, 5), 5), ((5, 1), 5),
                                        ((3, 3), 3), ((1, 7), 7)])
@pytest.mark.parametrize("stride", [1, 2])
def test_pad_kernel_to_equals_small_kernel_with_matching_padding(small, size, stride, dtype):
    gen = torch.Generator().manual_seed(size + small[0])
    kh, kw = small
    w = torch.randn(5, 3, kh, kw, generator=gen, dtype=dtype)
    x = torch.randn(2, 3, 11, 10, generator=gen, dtype=dtype)
    p = size // 2
    padded = T.pad_kernel_to(w, size)
    assert padded.shape == (5, 3, size, size)
    got = F.conv2d(x, padded, stride=stride, padding=p)
    expected = F.conv2d(x, w, stride=stride, padding=(p - (size - kh) // 2, p - (size - kw) // 2))
    assert rel_err(got, expected) <= TOL[dtype]
    # zero outside the centred window, original values inside
    oh, ow = (size - kh) // 2, (size - kw) // 2
    assert torch.equal(padded[..., oh:oh + kh, ow:ow + kw], w)
    assert float(padded.abs().sum()) == pytest.approx(float(w.abs().sum()), rel=1e-6)


@pytest.mark.parametrize("small,size", [((3, 3), 1), ((1, 1), 2), ((3, 3), 4), ((2, 2), 3)])
def test_pad_kernel_to_rejects_impossible_centring(small, size):
    with pytest.raises(ValueError):
        T.pad_kernel_to(torch.zeros(2, 2, *small), size)


def sequential_1x1_kxk_padded_with_bias(x, k1, b1, k2, b2, stride, padding, groups):
    """conv1x1 -> pad with b1 (not zeros) -> conv kxk (no padding): the un-merged reference."""
    y = F.conv2d(x, k1, b1, groups=groups)
    if padding:
        y = F.pad(y - b1.reshape(1, -1, 1, 1), [padding] * 4) + b1.reshape(1, -1, 1, 1)
    return F.conv2d(y, k2, b2, stride=stride, groups=groups)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 0), (7, 1, 4), (3, 1, 0)])
def test_merge_1x1_kxk_equals_sequential_convs(k, stride, padding, groups, dtype):
    gen = torch.Generator().manual_seed(k * 100 + stride * 10 + padding)
    c_in = 4
    g = c_in if groups == "dw" else groups
    mid = 8 if groups == "dw" else 6
    c_out = 4 if groups == "dw" else 6
    k1 = torch.randn(mid, c_in // g, 1, 1, generator=gen, dtype=dtype)
    b1 = torch.randn(mid, generator=gen, dtype=dtype)
    k2 = torch.randn(c_out, mid // g, k, k, generator=gen, dtype=dtype)
    b2 = torch.randn(c_out, generator=gen, dtype=dtype)
    x = torch.randn(2, c_in, 12, 11, generator=gen, dtype=dtype)

    merged_k, merged_b = T.merge_1x1_kxk(k1, b1, k2, b2, g)
    assert merged_k.shape == (c_out, c_in // g, k, k) and merged_b.shape == (c_out,)
    expected = sequential_1x1_kxk_padded_with_bias(x, k1, b1, k2, b2, stride, padding, g)
    got = F.conv2d(x, merged_k, merged_b, stride=stride, padding=padding, groups=g)
    assert rel_err(got, expected) <= TOL[dtype]


@pytest.mark.parametrize("groups", [1, 2, "dw"])
def test_merge_1x1_kxk_interior_with_zero_padding(groups):
    """With ordinary zero padding of the 1x1 output the identity holds in the interior only."""
    gen = torch.Generator().manual_seed(7)
    dtype = torch.float64
    c_in, k, p = 4, 3, 1
    g = c_in if groups == "dw" else groups
    mid, c_out = (8, 4) if groups == "dw" else (4, 6)
    k1 = torch.randn(mid, c_in // g, 1, 1, generator=gen, dtype=dtype)
    b1 = torch.randn(mid, generator=gen, dtype=dtype)
    k2 = torch.randn(c_out, mid // g, k, k, generator=gen, dtype=dtype)
    b2 = torch.randn(c_out, generator=gen, dtype=dtype)
    x = torch.randn(1, c_in, 9, 9, generator=gen, dtype=dtype)
    seq = F.conv2d(F.conv2d(x, k1, b1, groups=g), k2, b2, padding=p, groups=g)
    mk, mb = T.merge_1x1_kxk(k1, b1, k2, b2, g)
    merged = F.conv2d(x, mk, mb, padding=p, groups=g)
    assert rel_err(merged[..., 1:-1, 1:-1], seq[..., 1:-1, 1:-1]) <= 1e-12
    # ...and the border differs (b1 != 0), which is why BNAndPad pads with the bias
    assert float((merged - seq).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 0), (5, 2, 2), (7, 1, 3)])
def test_avg_pool_kernel_equals_avg_pool2d(k, stride, padding, groups, dtype):
    gen = torch.Generator().manual_seed(k + stride)
    c = 6
    g = c if groups == "dw" else groups
    x = torch.randn(2, c, 13, 12, generator=gen, dtype=dtype)
    kernel = T.avg_pool_kernel(c, k, g, like=x)
    assert kernel.dtype == dtype and kernel.shape == (c, c // g, k, k)
    got = F.conv2d(x, kernel, stride=stride, padding=padding, groups=g)
    expected = F.avg_pool2d(x, k, stride=stride, padding=padding, count_include_pad=True)
    assert rel_err(got, expected) <= TOL[dtype]


@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_merge_1x1_avg_closed_form_equals_the_general_merge_and_the_ops(k, groups):
    """The 1x1_avg branch's closed form: the same kernel and bias as merge_1x1_kxk with the BN-fused avg-pool
    kernel, and as the ops themselves (1x1 conv, padding with its bias, avg-pool, BN) away from the border."""
    gen = torch.Generator().manual_seed(30 + k)
    c_in, c = 4, 6
    g = c if groups == "dw" else groups
    c_in = c if groups == "dw" else c_in * g
    k1 = torch.randn(c, c_in // g, 1, 1, generator=gen, dtype=torch.float64)
    b1 = torch.randn(c, generator=gen, dtype=torch.float64)
    mean, var = torch.randn(c, generator=gen, dtype=torch.float64), torch.rand(c, generator=gen, dtype=torch.float64)
    gamma, beta = torch.randn(c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64)
    scale2, shift2 = T.bn_scale_shift(mean, var + 0.5, gamma, beta, 1e-5)
    kernel, bias = T.merge_1x1_avg(k1, b1, k, scale2, shift2)
    k2, b2 = T.fuse_conv_bn(T.avg_pool_kernel(c, k, g, like=k1), None, mean, var + 0.5, gamma, beta, 1e-5)
    general_kernel, general_bias = T.merge_1x1_kxk(k1, b1, k2, b2, g)
    assert kernel.shape == general_kernel.shape == (c, c_in // g, k, k)
    assert rel_err(kernel, general_kernel) <= 1e-14 and rel_err(bias, general_bias) <= 1e-14
    x = torch.randn(2, c_in, 9, 8, generator=gen, dtype=torch.float64)
    ops = F.avg_pool2d(F.conv2d(x, k1, b1, groups=g), k, 1) * scale2.reshape(1, -1, 1, 1) + shift2.reshape(1, -1, 1, 1)
    assert rel_err(F.conv2d(x, kernel, bias, groups=g), ops) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, "dw"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_identity_kernel_is_identity(k, groups, dtype):
    gen = torch.Generator().manual_seed(k)
    c = 6
    g = c if groups == "dw" else groups
    x = torch.randn(2, c, 8, 9, generator=gen, dtype=dtype)
    kernel = T.identity_kernel(c, k, g, like=x)
    assert kernel.dtype == dtype and kernel.shape == (c, c // g, k, k)
    got = F.conv2d(x, kernel, padding=k // 2, groups=g)
    assert torch.equal(got, x)  # one 1.0 tap per output channel: exact
    assert float(kernel.sum()) == c


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sum_branches_equals_sum_of_parallel_convs(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=dtype)
    kernels = [torch.randn(5, 4, 3, 3, generator=gen, dtype=dtype) for _ in range(4)]
    biases = [torch.randn(5, generator=gen, dtype=dtype) for _ in range(4)]
    expected = sum(F.conv2d(x, k, b, padding=1) for k, b in zip(kernels, biases))
    sk, sb = T.sum_branches(kernels, biases)
    assert rel_err(F.conv2d(x, sk, sb, padding=1), expected) <= TOL[dtype]
    single_k, single_b = T.sum_branches(kernels[:1], biases[:1])
    assert torch.equal(single_k, kernels[0]) and torch.equal(single_b, biases[0])
    with pytest.raises(ValueError):
        T.sum_branches([], [])
