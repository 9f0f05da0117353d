"""The bn block's fused training forward keeps little for backward, and the benchmark's baseline is the original.

* the 1x1 branches (``1x1``, ``1x1_kxk`` up to its kxk conv, ``1x1_avg``) save only the block input and their
  parameters and are recomputed in backward: saved-tensor bytes stay under a bound derived from the shapes;
* the recomputed path is the same block as the branch modules (float64 and float32, explicit tolerances):
  output, input and parameter gradients, BN running statistics and ``num_batches_tracked``, several steps,
  stride 1 and 2, with and without the 1x1 branch, padding != k // 2, cumulative-average BNs;
* double backward is refused with torch's once_differentiable error; no_grad and eval keep working;
* ``bench/dbb_original.py`` (the original DyRep block, re-implemented) computes the same function.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.common import saved_tensor_bytes
from bench.dbb_original import original_from_block
from dyrep_ray.rep.dbb import DiverseBranchBlock
from tests.test_bench_smoke import randomize

# c_in, c_out, k, stride, padding, branches (None: every allowed one)
CONFIGS = [(5, 5, 3, 1, 1, None), (5, 6, 3, 2, 1, None), (5, 5, 3, 1, 1, ["1x1_kxk", "1x1_avg", "kxk", "1xk"]),
           (5, 5, 3, 1, 0, None), (4, 4, 5, 2, 1, None)]


def _block(c_in, c_out, k, stride, padding, branches, dtype, seed=0) -> DiverseBranchBlock:
    block = DiverseBranchBlock(c_in, c_out, k, stride, padding, branches=branches, dtype=dtype)
    randomize(block, seed=seed)
    block.train()
    assert block._fusable()
    return block


def test_saved_tensor_bytes_are_bounded_by_the_kxk_sized_activations():
    """A regression that saves per-branch activations again (the 1x1 outputs, the BN outputs feeding the kxk
    conv and the avg-pool) fails: what may be saved is the input, the four outputs of the convs that are not
    recomputed (kxk, 1x1_kxk's kxk, 1xk, kx1), the parameters and per-channel statistics."""
    n, c, side = 4, 8, 12
    block = _block(c, c, 3, 1, 1, None, torch.float32)
    assert len(block.branch_names) == 7
    x = torch.randn(n, c, side, side, requires_grad=True)
    act = x.numel() * x.element_size()
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    per_channel = 9 * 4 * c * 4  # mean and invstd of each BN, a few pad values: tiny next to activations
    bound = 5 * act + params + per_channel
    saved = saved_tensor_bytes(lambda: block(x))
    assert saved <= bound, (saved / act, bound / act)
    # and the per-branch path really saves more (the bound is not vacuous)
    reference = saved_tensor_bytes(lambda: block._forward_branches(x))
    assert reference > bound + 3 * act


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,branches", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recomputed_branches_equal_branch_modules(c_in, c_out, k, stride, padding, branches, dtype):
    block = _block(c_in, c_out, k, stride, padding, branches, dtype, seed=k + stride + padding)
    for name in ("1x1_avg", "1x1"):  # a cumulative average (momentum None) on some recomputed BNs
        if name in block.branches:
            for m in block.branches[name].modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = None
    reference = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(1)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-4, 2e-5)
    for _ in range(3):
        x = torch.randn(3, c_in, 9, 8, generator=gen, dtype=torch.float64).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = block(xa), reference._forward_branches(xb)
        torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
        g = torch.randn(ya.shape, generator=gen, dtype=torch.float64).to(dtype)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
    for (name, pa), (_, pb) in zip(block.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol * 10, msg=name)
    for (name, ba), (_, bb) in zip(block.named_buffers(), reference.named_buffers(), strict=True):
        if ba.dtype == torch.int64:
            assert torch.equal(ba, bb) and int(ba) == 3, name
        else:
            torch.testing.assert_close(ba, bb, rtol=rtol, atol=atol, msg=name)


def test_double_backward_is_refused_clearly():
    block = _block(4, 4, 3, 1, 1, None, torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_no_grad_and_eval_match_the_branch_modules():
    block = _block(4, 4, 3, 1, 1, None, torch.float64)
    reference = copy.deepcopy(block)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():  # train-mode BNs under no_grad (BN recalibration): stats still advance once
        torch.testing.assert_close(block(x), reference._forward_branches(x), rtol=1e-12, atol=1e-12)
    for ba, bb in zip(block.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ba, bb, rtol=1e-12, atol=1e-14)
    block.eval()
    reference.eval()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = block(xa), reference._forward_branches(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def _original_name(ours: str) -> str:
    for a, b in ((".1x1_kxk.bn1.", ".1x1_kxk.bn1."), (".1x1_kxk.bn.", ".1x1_kxk.bn2."),
                 (".1x1_avg.conv1.", ".1x1_avg.conv."), (".1x1_avg.bn1.", ".1x1_avg.bn."),
                 (".1x1_avg.bn.", ".1x1_avg.avgbn."), (".identity.bn.", ".id.")):
        if a in ours:
            ours = ours.replace(a, b)
            break
    return ours.replace("branches.", "dbb_")


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,branches", CONFIGS[:4])
def test_faithful_original_computes_the_same_block(c_in, c_out, k, stride, padding, branches):
    block = _block(c_in, c_out, k, stride, padding, branches, torch.float64, seed=7)
    original = original_from_block(copy.deepcopy(block))
    assert_same_training_like(original, block, (2, c_in, 7, 8))


def assert_same_training_like(original: nn.Module, block: DiverseBranchBlock, x_shape) -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = original(xa), block._forward_branches(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
        g = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    theirs = dict(original.named_parameters())
    assert set(theirs) - {_original_name(n) for n, _ in block.named_parameters()} == {"dbb_kxk.conv.bias"}
    for name, p in block.named_parameters():
        torch.testing.assert_close(theirs[_original_name(name)].grad, p.grad, rtol=1e-10, atol=1e-11, msg=name)
    their_buffers = dict(original.named_buffers())
    for name, b in block.named_buffers():
        torch.testing.assert_close(their_buffers[_original_name(name)], b, rtol=1e-10, atol=1e-12, msg=name)
