"""Diverse Branch Block: a kxk conv re-expressed as a sum of up to seven branches.

Branch names (``BRANCH_NAMES``) and what each computes (all followed by a BN):

* ``1x1``      conv 1x1 (stride s)
* ``1x1_kxk``  conv 1x1 -> BN -> pad with the BN's bias -> conv kxk (stride s)
* ``1x1_avg``  conv 1x1 -> BN -> pad with the BN's bias -> avg-pool kxk (stride s)
* ``kxk``      the original conv (may itself be a nested block)
* ``1xk`` / ``kx1`` asymmetric convs centred in the kxk window
* ``identity`` BN on the input (in == out channels, stride 1)

Every branch has a ``bn`` attribute: its last BatchNorm, whose mean |gamma| is the
branch's importance when cutting.  In eval mode the whole block equals one conv
with kernel/bias :meth:`DiverseBranchBlock.equivalent_kernel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transforms as T

BRANCH_NAMES = ("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1", "identity")
# Branches that need the kxk window centred on the output pixel (padding == k // 2).
CENTRED_BRANCHES = ("1x1", "1xk", "kx1", "identity")
KXK = "kxk"
# How a cut keeps the block's function: "reset" (the original DyRep) or "absorb" (dyrep-ray's first version).
CUT_MODES = ("reset", "absorb")
# Last-BN gamma of a new branch (the original DyRep's value).
DEFAULT_INIT_GAMMA = 0.01
# Attribute set on convs/blocks that replace a user's conv: whether the user's
# original conv had a bias (deploy must restore that layout).
ORIG_BIAS_ATTR = "dyrep_orig_bias"


class Branch(Protocol):
    """What every branch module offers (for the type checker: ``ModuleDict`` values are plain modules)."""

    bn: nn.BatchNorm2d

    def __call__(self, x: Tensor) -> Tensor: ...

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]: ...

# The block's BatchNorms always track running stats: their running_mean/var (Optional in torch's stubs) are
# cast to Tensor below.


def allowed_branches(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> tuple[str, ...]:
    """The branch set a block of this geometry can hold while staying exactly foldable."""
    names = list(BRANCH_NAMES)
    if padding != kernel_size // 2:
        names = [n for n in names if n not in CENTRED_BRANCHES]
    elif in_channels != out_channels or stride != 1:
        names.remove("identity")
    return tuple(names)


def block_branch_names(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int | None,
                       branches: Sequence[str] | None, block: str) -> tuple[int, tuple[str, ...]]:
    """(padding, branch names) of a new ``block`` (class name, for the errors): the default padding is "same",
    the default branch set every allowed one; an unknown or disallowed branch, or no kxk, is a ValueError."""
    padding = kernel_size // 2 if padding is None else padding
    allowed = allowed_branches(in_channels, out_channels, kernel_size, stride, padding)
    names = allowed if branches is None else tuple(branches)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"branches {unknown} not allowed for this geometry (allowed: {list(allowed)})")
    if KXK not in names:
        raise ValueError(f"a{'n' if block[0] in 'AEIOU' else ''} {block} always holds its 'kxk' branch")
    return padding, names


def mid_channels_1x1_kxk(in_channels: int, out_channels: int, groups: int) -> int:
    """Width of the 1x1->kxk bottleneck: ``in_channels``, depthwise included (the original DyRep's
    DBB; Ding et al.'s DBB doubles it for depthwise convs)."""
    return in_channels


def avg_branch_without_conv(in_channels: int, out_channels: int, groups: int) -> bool:
    """Depthwise geometry (groups >= out_channels, in == out): the original's 1x1_avg branch is a
    zero-padded avg-pool -> BN, with no 1x1 conv in front."""
    return groups >= out_channels and in_channels == out_channels


class BNAndPad(nn.Module):
    """BatchNorm whose output is padded with the BN's own eval-mode bias, not zeros.

    A 1x1 conv+BN fused into a kernel with bias ``b`` yields ``b`` on zero-padded
    borders; padding with ``b`` here keeps the two-conv branch exactly foldable.
    """

    def __init__(self, num_features: int, pad: int, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, device=device, dtype=dtype)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        _, shift = T.bn_scale_shift(
            cast(Tensor, self.bn.running_mean), cast(Tensor, self.bn.running_var), self.bn.weight.detach(),
            self.bn.bias.detach(), self.bn.eps
        )
        shift = shift.reshape(1, -1, 1, 1).to(out.dtype)
        return F.pad(out - shift, [self.pad] * 4) + shift


class ConvBN(nn.Module):
    """``bn(conv(x))``; ``conv`` is an ``nn.Conv2d`` or (kxk branch only) a nested block."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        kernel, bias = conv_kernel_and_bias(self.conv)
        bn = self.bn
        kernel, bias = T.fuse_conv_bn(kernel, bias, cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var),
                                      bn.weight, bn.bias, bn.eps)
        return T.pad_kernel_to(kernel, kernel_size), bias


class OneByOneKxk(nn.Module):
    """conv1x1 -> BN(pad with bias) -> conv kxk (no padding) -> BN."""

    def __init__(self, in_ch, mid_ch, out_ch, k, stride, pad, groups, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn1 = BNAndPad(mid_ch, pad, device=device, dtype=dtype)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, k, stride=stride, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_ch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv2(self.bn1(self.conv1(x))))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        b1n, b2n = self.bn1.bn, self.bn
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, cast(Tensor, b1n.running_mean),
                                cast(Tensor, b1n.running_var), b1n.weight, b1n.bias, b1n.eps)
        kernel2, bias2 = conv_kernel_and_bias(self.conv2)  # conv2 may itself have grown into a block
        k2, b2 = T.fuse_conv_bn(kernel2, bias2, cast(Tensor, b2n.running_mean), cast(Tensor, b2n.running_var),
                                b2n.weight, b2n.bias, b2n.eps)
        return T.merge_1x1_kxk(k1, b1, k2, b2, self.groups)


class OneByOneAvg(nn.Module):
    """conv1x1 -> BN(pad with bias) -> avg-pool kxk (no padding) -> BN."""

    def __init__(self, in_ch, out_ch, k, stride, pad, groups, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False, device=device, dtype=dtype)
        self.bn1 = BNAndPad(out_ch, pad, device=device, dtype=dtype)
        self.avg = nn.AvgPool2d(k, stride=stride, padding=0)
        self.bn = nn.BatchNorm2d(out_ch, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.avg(self.bn1(self.conv1(x))))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        b1n, b2n = self.bn1.bn, self.bn
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, cast(Tensor, b1n.running_mean),
                                cast(Tensor, b1n.running_var), b1n.weight, b1n.bias, b1n.eps)
        out_ch = k1.shape[0]
        avg = T.avg_pool_kernel(out_ch, kernel_size, self.groups, like=k1)
        k2, b2 = T.fuse_conv_bn(avg, None, cast(Tensor, b2n.running_mean), cast(Tensor, b2n.running_var),
                                b2n.weight, b2n.bias, b2n.eps)
        return T.merge_1x1_kxk(k1, b1, k2, b2, self.groups)


class AvgBN(nn.Module):
    """Zero-padded avg-pool kxk (count_include_pad) -> BN: the depthwise 1x1_avg branch (no conv)."""

    def __init__(self, channels: int, k: int, stride: int, pad: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.avg = nn.AvgPool2d(k, stride=stride, padding=pad, count_include_pad=True)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        pad = cast(int, self.avg.padding)  # built with int k, stride and padding
        if 2 * pad <= cast(int, self.avg.kernel_size):
            return self.bn(self.avg(x))
        # avg_pool2d refuses padding > k / 2: pad explicitly (same zero-padded sum, divisor k*k)
        return self.bn(F.avg_pool2d(F.pad(x, [pad] * 4), self.avg.kernel_size, self.avg.stride, 0))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        bn = self.bn
        running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
        avg = T.avg_pool_kernel(bn.num_features, kernel_size, self.groups, like=running_mean)
        return T.fuse_conv_bn(avg, None, running_mean, running_var, bn.weight, bn.bias, bn.eps)


class IdentityBN(nn.Module):
    """BN on the input itself (the residual-like branch)."""

    def __init__(self, channels: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        bn = self.bn
        running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
        ident = T.identity_kernel(bn.num_features, kernel_size, self.groups, like=running_mean)
        return T.fuse_conv_bn(ident, None, running_mean, running_var, bn.weight, bn.bias, bn.eps)


def conv_kernel_and_bias(conv: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Kernel and bias of a plain conv, or the equivalent kernel of a nested block."""
    if isinstance(conv, DiverseBranchBlock):
        return conv.equivalent_kernel()
    return cast(Tensor, conv.weight), cast("Tensor | None", conv.bias)  # a plain nn.Conv2d


@dataclass(frozen=True)
class BlockGeometry:
    """What every branch constructor needs: the block's conv hyper-parameters and factory kwargs."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    factory: dict  # {"device": ..., "dtype": ...} for new modules

    def conv(self, kernel: tuple[int, int], padding: tuple[int, int]) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, kernel, self.stride, padding, groups=self.groups,
                         bias=False, **self.factory)

    def bn(self) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(self.out_channels, **self.factory)


def _build_kxk(g: BlockGeometry, kxk_conv: nn.Module | None) -> nn.Module:
    k, p = g.kernel_size, g.padding
    return ConvBN(kxk_conv if kxk_conv is not None else g.conv((k, k), (p, p)), g.bn())


def _build_1x1_kxk(g: BlockGeometry, _: nn.Module | None) -> nn.Module:
    mid = mid_channels_1x1_kxk(g.in_channels, g.out_channels, g.groups)
    return OneByOneKxk(g.in_channels, mid, g.out_channels, g.kernel_size, g.stride, g.padding, g.groups,
                       **g.factory)


def _build_1x1_avg(g: BlockGeometry, _: nn.Module | None) -> nn.Module:
    if avg_branch_without_conv(g.in_channels, g.out_channels, g.groups):
        return AvgBN(g.out_channels, g.kernel_size, g.stride, g.padding, g.groups, **g.factory)
    return OneByOneAvg(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.groups, **g.factory)


# Branch name -> constructor(geometry, kxk_conv) (the kxk conv is only used by the kxk branch).
# Which names a geometry allows is :func:`allowed_branches`; the geometry rule of each conv
# (kernel shape, padding) is in its entry.
BRANCH_BUILDERS: dict[str, Callable[[BlockGeometry, nn.Module | None], nn.Module]] = {
    "1x1": lambda g, _: ConvBN(g.conv((1, 1), (0, 0)), g.bn()),
    "1x1_kxk": _build_1x1_kxk,
    "1x1_avg": _build_1x1_avg,
    KXK: _build_kxk,
    "1xk": lambda g, _: ConvBN(g.conv((1, g.kernel_size), (0, g.padding)), g.bn()),
    "kx1": lambda g, _: ConvBN(g.conv((g.kernel_size, 1), (g.padding, 0)), g.bn()),
    "identity": lambda g, _: IdentityBN(g.in_channels, g.groups, **g.factory),
}


class DiverseBranchBlock(nn.Module):
    """A kxk conv as a sum of diverse branches; see module docstring.

    ``branches`` selects which branches exist (default: every branch the geometry
    allows).  New modules are created on ``device``/``dtype``.  Parameters of new
    branches are left at PyTorch defaults: :func:`init_new_branches` applies DyRep's
    initialization.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        branches: Sequence[str] | None = None,
        kxk_conv: nn.Module | None = None,
        orig_bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        padding, names = block_branch_names(in_channels, out_channels, kernel_size, stride, padding, branches,
                                            type(self).__name__)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        setattr(self, ORIG_BIAS_ATTR, orig_bias)
        geometry = BlockGeometry(in_channels, out_channels, kernel_size, stride, padding, groups,
                                 {"device": device, "dtype": dtype})
        self.fused_conv: nn.Conv2d | None = None  # set by reparameterize()
        self.branches = nn.ModuleDict()
        for name in BRANCH_NAMES:  # canonical order keeps state_dict order stable
            if name in names:
                self.branches[name] = BRANCH_BUILDERS[name](geometry, kxk_conv)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        # Under torch.compile the per-branch forward: the fast path's check reads torch's hook registries
        # (a graph break), and the compiler fuses the elementwise work itself.
        if not torch.compiler.is_compiling() and self._fusable():
            return self._forward_fused(x)
        return self._forward_branches(x)

    def _forward_branches(self, x: Tensor) -> Tensor:
        """Reference path: every branch module on ``x``, summed as they come (no stacked temporary)."""
        out = None
        for branch in self.branches.values():
            y = branch(x)
            out = y if out is None else out + y
        return cast(Tensor, out)  # a block always holds its kxk branch

    def _fusable(self) -> bool:
        """True if the fused train-mode forward (:mod:`.dbb_fused`) computes exactly what the branch
        modules would; checked on every call."""
        return dbb_fused.fusable(self)

    def _forward_fused(self, x: Tensor) -> Tensor:
        return dbb_fused.forward_fused(self, x)

    # ------------------------------------------------------------- the algebra
    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    @property
    def kxk_branch(self) -> ConvBN:
        return cast(ConvBN, self.branches[KXK])

    def equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv this block equals in eval mode."""
        if self.fused_conv is not None:
            return self.fused_conv.weight, cast(Tensor, self.fused_conv.bias)  # to_conv() gives it a bias
        kernels, biases = [], []
        for branch in self.branches.values():
            k, b = cast(Branch, branch).equivalent_kernel(self.kernel_size)
            kernels.append(k)
            biases.append(b)
        return T.sum_branches(kernels, biases)

    def branch_kernel(self, name: str) -> tuple[Tensor, Tensor]:
        return cast(Branch, self.branches[name]).equivalent_kernel(self.kernel_size)

    def kxk_scale(self) -> Tensor:
        """Per-channel gamma of the kxk branch's BN (the reference of :meth:`branch_importance`; a cut with
        ``mode="absorb"`` divides by the BN's scale, so it needs this away from zero)."""
        return self.kxk_branch.bn.weight

    def branch_importance(self) -> dict[str, Tensor]:
        """mean|gamma| of each branch's last BN relative to the kxk branch's (kxk == 1)."""
        ref = self.kxk_scale().detach().abs().mean()
        return {n: cast(Branch, b).bn.weight.detach().abs().mean() / ref for n, b in self.branches.items()}

    @torch.no_grad()
    def absorb(self, kernel: Tensor, bias: Tensor) -> None:
        """Add ``conv(x; kernel) + bias`` to this block's eval-mode function via its kxk branch."""
        branch = self.kxk_branch
        bn = branch.bn
        scale, _ = T.bn_scale_shift(cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var), bn.weight, bn.bias,
                                    bn.eps)
        if bool((scale.abs() < torch.finfo(scale.dtype).tiny).any()):
            raise ValueError("kxk branch BN has a zero scale; cannot absorb a branch into it")
        conv_delta = kernel / scale.reshape(-1, 1, 1, 1)
        if isinstance(branch.conv, DiverseBranchBlock):
            branch.conv.absorb(conv_delta, torch.zeros_like(bias))
        else:
            conv = cast(nn.Conv2d, branch.conv)  # a kxk conv that is not a nested block is a plain conv
            conv.weight.add_(conv_delta.to(conv.weight.dtype))
        bn.bias.add_(bias.to(bn.bias.dtype))

    @torch.no_grad()
    def cut(self, names: Iterable[str], mode: str = "reset", seed: int = 0,
            init_gamma: float = DEFAULT_INIT_GAMMA) -> None:
        """Remove branches, keeping the block's eval-mode function exactly.

        ``mode="reset"`` (the original DyRep): surviving non-kxk branches keep their state; the
        kxk branch is reset (BN gamma=1, beta=0, fresh running stats) and its conv set to the
        fused block minus the remaining branches (with a bias).  A nested block in the kxk slot
        has its non-kxk branches re-initialised (seeded by ``seed``, last BN gamma ``init_gamma``)
        and its own kxk compensated.  ``mode="absorb"``: each cut branch's kernel is folded into
        the kxk branch (divided by the kxk BN scale); the kxk statistics are kept.
        """
        names = list(names)
        if mode not in CUT_MODES:
            raise ValueError(f"unknown cut mode {mode!r}; choose one of {list(CUT_MODES)}")
        if KXK in names:
            raise ValueError("the 'kxk' branch cannot be cut")
        missing = [n for n in names if n not in self.branches]
        if missing:
            raise ValueError(f"cannot cut {missing}: the block holds {self.branch_names}")
        if mode == "absorb":
            for name in names:
                kernel, bias = self.branch_kernel(name)
                self.absorb(kernel, bias)
                del self.branches[name]
            return
        target_kernel, target_bias = self.equivalent_kernel()
        for name in names:
            del self.branches[name]
        self.compensate_kxk(target_kernel, target_bias, torch.Generator().manual_seed(int(seed)), init_gamma)

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` (with bias) computing this block's eval-mode function."""
        kernel, bias = self.equivalent_kernel()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         groups=self.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        cast(Tensor, conv.bias).copy_(bias)  # built with bias=True
        setattr(conv, ORIG_BIAS_ATTR, getattr(self, ORIG_BIAS_ATTR))
        return conv

    def fuse(self) -> nn.Conv2d:
        """timm's re-parameterization contract: the module that replaces this block.

        ``timm.utils.reparameterize_model`` calls ``child.fuse()`` and puts the result in the
        parent, so every block (nested ones inside it included) folds into one conv.
        """
        return self.to_conv()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold this block in place (timm's other contract: ``module.reparameterize()`` returns
        nothing): the branches are dropped and the block forwards through one fused conv.

        A fused block is inference-only: it can be deployed or folded into an outer block, not
        grown, cut or described in a structure graph.  Use :meth:`to_conv` for a separate conv.
        """
        if self.fused_conv is not None:
            return
        conv = self.to_conv()
        conv.train(self.training)
        self.branches = nn.ModuleDict()
        self.fused_conv = conv

    @property
    def is_fused(self) -> bool:
        return self.fused_conv is not None

    @torch.no_grad()
    def compensate_kxk(self, target_kernel: Tensor, target_bias: Tensor,
                       generator: torch.Generator | None = None, init_gamma: float = DEFAULT_INIT_GAMMA) -> None:
        """Set the kxk branch so that the block's eval-mode function equals the target conv.

        The kxk BN is reset (gamma=1, beta=0, fresh stats) and the kernel is scaled by
        sqrt(1 + eps) so that its eval-mode fold is exact (no 1/sqrt(1+eps) residue).  A nested
        block in the kxk slot is re-initialised (its non-kxk branches drawn from ``generator``)
        and compensated recursively to the kernel the kxk conv must have.
        """
        others_k = torch.zeros_like(target_kernel)
        others_b = torch.zeros_like(target_bias)
        for name in self.branch_names:
            if name != KXK:
                k, b = self.branch_kernel(name)
                others_k += k
                others_b += b
        branch = self.kxk_branch
        bn = branch.bn
        bn.reset_running_stats()
        bn.weight.fill_(1.0)
        std = math.sqrt(1.0 + bn.eps)  # eval-mode std of the freshly reset BN
        conv_kernel = (target_kernel - others_k) * std
        residual_bias = target_bias - others_b
        if isinstance(branch.conv, DiverseBranchBlock):
            if generator is None:
                raise ValueError("re-initialising a nested block in the kxk slot needs a generator")
            nested = branch.conv
            init_new_branches(nested, init_gamma, generator)
            nested.compensate_kxk(conv_kernel, torch.zeros_like(target_bias), generator, init_gamma)
        else:
            conv = cast(nn.Conv2d, branch.conv)  # a kxk conv that is not a nested block is a plain conv
            conv.weight.copy_(conv_kernel.to(conv.weight.dtype))
            if conv.bias is not None:
                residual_bias = residual_bias - conv.bias / std
        bn.bias.copy_(residual_bias.to(bn.bias.dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, branches={self.branch_names}")

    def describe(self) -> dict:
        """JSON-serializable geometry + branch set (for the structure graph)."""
        if self.fused_conv is not None:
            raise ValueError("a block folded by reparameterize() has no branch structure to describe")
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "groups": self.groups,
            "branches": self.branch_names,
            "orig_bias": bool(getattr(self, ORIG_BIAS_ATTR)),
        }


# ---------------------------------------------------------------------------
# Eligibility and construction from a plain conv
# ---------------------------------------------------------------------------
def conv_geometry(conv: nn.Conv2d) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) if ``conv`` can become a block, else None.

    Odd square kernels only: the centred branches need a centre tap.
    """
    if type(conv) is not nn.Conv2d:
        return None
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    if isinstance(conv.padding, str):
        return None
    ph, pw = conv.padding
    if (kh != kw or kh <= 1 or kh % 2 == 0 or sh != sw or ph != pw or conv.dilation != (1, 1)
            or conv.padding_mode != "zeros"):
        return None
    return kh, sh, ph


def block_from_conv(conv: nn.Conv2d, branches: Sequence[str] | None = None) -> DiverseBranchBlock:
    """A block whose kxk branch reuses ``conv`` (its bias removed: the caller keeps the target).

    Reusing the conv keeps its ``weight`` Parameter object, so optimizer state survives.
    """
    geom = conv_geometry(conv)
    if geom is None:
        raise ValueError(f"conv {conv} is not eligible for growth (needs square k>1, no dilation, zero padding)")
    k, s, p = geom
    orig_bias = getattr(conv, ORIG_BIAS_ATTR, conv.bias is not None)
    if conv.bias is not None:
        conv.register_parameter("bias", None)
    if hasattr(conv, ORIG_BIAS_ATTR):
        delattr(conv, ORIG_BIAS_ATTR)
    w = conv.weight
    return DiverseBranchBlock(conv.in_channels, conv.out_channels, k, s, p, conv.groups, branches=branches,
                              kxk_conv=conv, orig_bias=orig_bias, device=w.device, dtype=w.dtype)


@torch.no_grad()
def init_new_branches(block: DiverseBranchBlock, init_gamma: float, generator: torch.Generator) -> None:
    """DyRep's init of the non-kxk branches: Kaiming-normal (fan-out) convs, last BN gamma=init_gamma.

    Random numbers are drawn on the CPU in float64 from ``generator`` and then cast,
    so every device/rank produces the same values for the same seed.
    """
    for name, branch in block.branches.items():
        if name == KXK:
            continue
        for module in branch.modules():
            if isinstance(module, nn.Conv2d):
                cpu = torch.empty(module.weight.shape, dtype=torch.float64)
                nn.init.kaiming_normal_(cpu, mode="fan_out", nonlinearity="relu", generator=generator)
                module.weight.copy_(cpu.to(module.weight.dtype))
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()
        last_bn = cast(Branch, branch).bn
        last_bn.weight.fill_(init_gamma)
        last_bn.bias.zero_()


def new_branch_batchnorms(block: DiverseBranchBlock) -> list[nn.BatchNorm2d]:
    """BatchNorms of every non-kxk branch (the ones BN recalibration must fill)."""
    return [m for name, b in block.branches.items() if name != KXK for m in b.modules()
            if isinstance(m, nn.BatchNorm2d)]


# The fused train-mode forward lives in its own module; it needs the branch classes above, so it
# is imported once they exist (dbb_fused imports this module at its top).
from . import dbb_fused  # noqa: E402  (circular by design: see above)
from .dbb_fused import _avg_pool_zero_padded  # noqa: E402, F401  (kept importable from here)
