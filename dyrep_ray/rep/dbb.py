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
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

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
            self.bn.running_mean, self.bn.running_var, self.bn.weight.detach(), self.bn.bias.detach(), self.bn.eps
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
        kernel, bias = T.fuse_conv_bn(kernel, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
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
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, b1n.running_mean, b1n.running_var, b1n.weight, b1n.bias, b1n.eps)
        kernel2, bias2 = conv_kernel_and_bias(self.conv2)  # conv2 may itself have grown into a block
        k2, b2 = T.fuse_conv_bn(kernel2, bias2, b2n.running_mean, b2n.running_var, b2n.weight, b2n.bias, b2n.eps)
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
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, b1n.running_mean, b1n.running_var, b1n.weight, b1n.bias, b1n.eps)
        out_ch = k1.shape[0]
        avg = T.avg_pool_kernel(out_ch, kernel_size, self.groups, like=k1)
        k2, b2 = T.fuse_conv_bn(avg, None, b2n.running_mean, b2n.running_var, b2n.weight, b2n.bias, b2n.eps)
        return T.merge_1x1_kxk(k1, b1, k2, b2, self.groups)


class AvgBN(nn.Module):
    """Zero-padded avg-pool kxk (count_include_pad) -> BN: the depthwise 1x1_avg branch (no conv)."""

    def __init__(self, channels: int, k: int, stride: int, pad: int, groups: int, device=None, dtype=None):
        super().__init__()
        self.groups = groups
        self.avg = nn.AvgPool2d(k, stride=stride, padding=pad, count_include_pad=True)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        pad = self.avg.padding
        if 2 * pad <= self.avg.kernel_size:
            return self.bn(self.avg(x))
        # avg_pool2d refuses padding > k / 2: pad explicitly (same zero-padded sum, divisor k*k)
        return self.bn(F.avg_pool2d(F.pad(x, [pad] * 4), self.avg.kernel_size, self.avg.stride, 0))

    def equivalent_kernel(self, kernel_size: int) -> tuple[Tensor, Tensor]:
        bn = self.bn
        avg = T.avg_pool_kernel(bn.num_features, kernel_size, self.groups, like=bn.running_mean)
        return T.fuse_conv_bn(avg, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


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
        ident = T.identity_kernel(bn.num_features, kernel_size, self.groups, like=bn.running_mean)
        return T.fuse_conv_bn(ident, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def conv_kernel_and_bias(conv: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Kernel and bias of a plain conv, or the equivalent kernel of a nested block."""
    if isinstance(conv, DiverseBranchBlock):
        return conv.equivalent_kernel()
    return conv.weight, conv.bias


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
        padding = kernel_size // 2 if padding is None else padding
        allowed = allowed_branches(in_channels, out_channels, kernel_size, stride, padding)
        names = allowed if branches is None else tuple(branches)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"branches {unknown} not allowed for this geometry (allowed: {list(allowed)})")
        if KXK not in names:
            raise ValueError("a DiverseBranchBlock always holds its 'kxk' branch")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        setattr(self, ORIG_BIAS_ATTR, orig_bias)
        k, s, p, g = kernel_size, stride, padding, groups
        kw = dict(device=device, dtype=dtype)
        self.fused_conv: nn.Conv2d | None = None  # set by reparameterize()
        self.branches = nn.ModuleDict()
        for name in BRANCH_NAMES:  # canonical order keeps state_dict order stable
            if name not in names:
                continue
            if name == KXK:
                conv = kxk_conv if kxk_conv is not None else nn.Conv2d(
                    in_channels, out_channels, k, s, p, groups=g, bias=False, **kw)
                branch = ConvBN(conv, nn.BatchNorm2d(out_channels, **kw))
            elif name == "1x1":
                branch = ConvBN(nn.Conv2d(in_channels, out_channels, 1, s, 0, groups=g, bias=False, **kw),
                                nn.BatchNorm2d(out_channels, **kw))
            elif name == "1x1_kxk":
                mid = mid_channels_1x1_kxk(in_channels, out_channels, g)
                branch = OneByOneKxk(in_channels, mid, out_channels, k, s, p, g, **kw)
            elif name == "1x1_avg":
                if avg_branch_without_conv(in_channels, out_channels, g):
                    branch = AvgBN(out_channels, k, s, p, g, **kw)
                else:
                    branch = OneByOneAvg(in_channels, out_channels, k, s, p, g, **kw)
            elif name == "1xk":
                branch = ConvBN(nn.Conv2d(in_channels, out_channels, (1, k), s, (0, p), groups=g, bias=False, **kw),
                                nn.BatchNorm2d(out_channels, **kw))
            elif name == "kx1":
                branch = ConvBN(nn.Conv2d(in_channels, out_channels, (k, 1), s, (p, 0), groups=g, bias=False, **kw),
                                nn.BatchNorm2d(out_channels, **kw))
            else:  # identity
                branch = IdentityBN(in_channels, g, **kw)
            self.branches[name] = branch

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        if self._fusable():
            return self._forward_fused(x)
        return self._forward_branches(x)

    def _forward_branches(self, x: Tensor) -> Tensor:
        """Reference path: every branch module on ``x``, summed as they come (no stacked temporary)."""
        out = None
        for branch in self.branches.values():
            y = branch(x)
            out = y if out is None else out + y
        return out

    def _fusable(self) -> bool:
        """True if :meth:`_forward_fused` computes exactly what the branch modules would.

        It needs ``groups == 1``, the branch modules this class builds (exact types, plain
        ``nn.Conv2d`` without bias, plain ``nn.BatchNorm2d``) and no hooks anywhere in the block:
        the fused path calls the convs of the 1x1 / 1x1_kxk / 1x1_avg branches functionally, so
        their hooks would not fire, and it adds into a tensor in place.  Anything else takes
        :meth:`_forward_branches`.  Checked on every call (cheap: direct attribute access only).
        """
        if self.groups != 1 or _global_module_hooks():
            return False
        for name, branch in self.branches._modules.items():
            parts = _fusable_parts(name, branch, self.kernel_size, self.stride)
            if parts is None or any(_has_hooks(m) for m in parts):
                return False
        return True

    def _forward_fused(self, x: Tensor) -> Tensor:
        """The same function (and the same BN running-stat updates) as :meth:`_forward_branches`, faster.

        * the 1x1 convs that read ``x`` at stride 1 (``1x1`` when stride is 1, and the first conv of
          ``1x1_kxk`` / ``1x1_avg``) run as one conv on their concatenated weights (``torch.cat`` in
          the graph, so each Parameter gets its gradient); each slice then goes through its own BN;
        * ``BNAndPad`` + unpadded kxk conv / avg-pool becomes a zero-padded conv / avg-pool plus a
          tiny input-independent border term (the bias padding's contribution), so no padded copy
          of the activation is made and the three elementwise passes of ``BNAndPad`` disappear;
        * branch outputs are accumulated in place into one tensor the block owns.
        Every BatchNorm is still its own module, called once on its own branch's tensor, so batch
        statistics, running-stat updates (momentum, ``num_batches_tracked``) and train/eval flags are
        exactly per branch.
        """
        br = self.branches
        k, s = self.kernel_size, self.stride
        one, two, avg = (br[n] if n in br else None for n in ("1x1", "1x1_kxk", "1x1_avg"))
        # The kxk branch's BN output is a fresh tensor nothing else holds (no hooks: see _fusable),
        # so the other branches are added into it in place -- unless a branch's dtype would promote
        # the sum (autocast: BN outputs can be wider than conv outputs), then once out of place.
        out = br[KXK](x)

        def accumulate(y: Tensor) -> None:
            nonlocal out
            if torch.result_type(out, y) == out.dtype:
                out.add_(y)
            else:
                out = out + y

        # 1x1 convs reading x at stride 1: one GEMM over their concatenated weights.
        readers: list[nn.Conv2d] = []
        if one is not None and s == 1:
            readers.append(one.conv)
        readers += [b.conv1 for b in (two, avg) if b is not None]
        if len(readers) > 1:
            weight = torch.cat([c.weight for c in readers])
            outs = F.conv2d(x, weight).split([c.out_channels for c in readers], dim=1)
        else:
            outs = [c(x) for c in readers]
        outs = dict(zip((id(c) for c in readers), outs))
        if one is not None:
            y = outs[id(one.conv)] if s == 1 else one.conv(x)
            accumulate(one.bn(y))
        if two is not None:
            z = _bn_then_padded(two.bn1, outs[id(two.conv1)])
            conv2 = two.conv2
            y = F.conv2d(z.tensor, conv2.weight, None, conv2.stride, z.pad)
            if z.pad:  # in place: a conv does not keep its output for backward
                y.add_(_padding_term_conv(conv2.weight, z.shift, z.height, z.width, z.pad, conv2.stride).to(y.dtype))
            accumulate(two.bn(y))
        if avg is not None:
            z = _bn_then_padded(avg.bn1, outs[id(avg.conv1)])
            y = _avg_pool_zero_padded(z.tensor, k, s, z.pad)
            if z.pad:  # in place: neither pooling op keeps its output for backward
                y.add_(_padding_term_avg(z.shift, z.height, z.width, z.pad, k, s, like=y))
            accumulate(avg.bn(y))
        for name in ("1xk", "kx1", "identity"):
            if name in br:
                accumulate(br[name](x))
        return out

    # ------------------------------------------------------------- the algebra
    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    @property
    def kxk_branch(self) -> ConvBN:
        return self.branches[KXK]

    def equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv this block equals in eval mode."""
        if self.fused_conv is not None:
            return self.fused_conv.weight, self.fused_conv.bias
        kernels, biases = [], []
        for branch in self.branches.values():
            k, b = branch.equivalent_kernel(self.kernel_size)
            kernels.append(k)
            biases.append(b)
        return T.sum_branches(kernels, biases)

    def branch_kernel(self, name: str) -> tuple[Tensor, Tensor]:
        return self.branches[name].equivalent_kernel(self.kernel_size)

    def branch_importance(self) -> dict[str, Tensor]:
        """mean|gamma| of each branch's last BN relative to the kxk branch's (kxk == 1)."""
        ref = self.kxk_branch.bn.weight.detach().abs().mean()
        return {n: b.bn.weight.detach().abs().mean() / ref for n, b in self.branches.items()}

    @torch.no_grad()
    def absorb(self, kernel: Tensor, bias: Tensor) -> None:
        """Add ``conv(x; kernel) + bias`` to this block's eval-mode function via its kxk branch."""
        branch = self.kxk_branch
        bn = branch.bn
        scale, _ = T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if bool((scale.abs() < torch.finfo(scale.dtype).tiny).any()):
            raise ValueError("kxk branch BN has a zero scale; cannot absorb a branch into it")
        conv_delta = kernel / scale.reshape(-1, 1, 1, 1)
        if isinstance(branch.conv, DiverseBranchBlock):
            branch.conv.absorb(conv_delta, torch.zeros_like(bias))
        else:
            branch.conv.weight.add_(conv_delta.to(branch.conv.weight.dtype))
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
        conv.bias.copy_(bias)
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
            branch.conv.weight.copy_(conv_kernel.to(branch.conv.weight.dtype))
            if branch.conv.bias is not None:
                residual_bias = residual_bias - branch.conv.bias / std
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
# Helpers of the fused forward
# ---------------------------------------------------------------------------
def _fusable_parts(name: str, branch: nn.Module, k: int, s: int) -> list[nn.Module] | None:
    """The modules of ``branch`` the fused forward relies on, or None if the branch is not the
    plain structure :class:`DiverseBranchBlock` builds."""
    sub = branch._modules
    if name in ("kxk", "1x1", "1xk", "kx1"):
        if type(branch) is not ConvBN or type(sub["bn"]) is not nn.BatchNorm2d:
            return None
        conv = sub["conv"]
        if name == KXK and isinstance(conv, DiverseBranchBlock):
            return [branch, conv, sub["bn"]]  # called as a module: the nested block decides for itself
        if not _plain_conv(conv) or (name == KXK and conv.bias is not None):
            return None
        return [branch, conv, sub["bn"]]
    if name == "identity":
        return [branch, sub["bn"]] if type(branch) is IdentityBN and type(sub["bn"]) is nn.BatchNorm2d else None
    expected = OneByOneKxk if name == "1x1_kxk" else OneByOneAvg
    if type(branch) is not expected or type(sub["bn1"]) is not BNAndPad:
        return None
    bn1 = sub["bn1"]._modules["bn"]
    if type(bn1) is not nn.BatchNorm2d or type(sub["bn"]) is not nn.BatchNorm2d or not _plain_conv(sub["conv1"]):
        return None
    second = sub["conv2"] if name == "1x1_kxk" else sub["avg"]
    if not (_plain_conv(second) if name == "1x1_kxk" else _plain_avg_pool(second, k, s)):
        return None
    return [branch, sub["conv1"], sub["bn1"], bn1, second, sub["bn"]]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple(getattr(_torch_module, f"_global{n}") for n in _HOOK_DICTS
                           if hasattr(_torch_module, f"_global{n}"))


def _has_hooks(module: nn.Module) -> bool:
    d = module.__dict__
    return any(d.get(n) for n in _HOOK_DICTS)


def _global_module_hooks() -> bool:
    return any(_GLOBAL_HOOK_DICTS)


def _plain_conv(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.__dict__["_parameters"].get("bias") is None and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _plain_avg_pool(pool: nn.Module, k: int, s: int) -> bool:
    return (type(pool) is nn.AvgPool2d and pool.kernel_size == k and pool.stride == s and pool.padding == 0
            and pool.count_include_pad and not pool.ceil_mode and pool.divisor_override is None)


class _Padded:
    """A BN output meant to be padded by ``pad`` with the per-channel value ``shift`` (not yet padded)."""

    __slots__ = ("tensor", "shift", "pad", "height", "width")

    def __init__(self, tensor: Tensor, shift: Tensor | None, pad: int):
        self.tensor, self.shift, self.pad = tensor, shift, pad
        self.height, self.width = tensor.shape[-2:]


def _bn_then_padded(bnpad: BNAndPad, y: Tensor) -> _Padded:
    """``bnpad``'s BN on ``y`` and the pad value ``BNAndPad.forward`` would use (after the BN's update)."""
    out = bnpad.bn(y)
    if bnpad.pad == 0:
        return _Padded(out, None, 0)
    bn = bnpad.bn
    _, shift = T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), bn.eps)
    return _Padded(out, shift, bnpad.pad)


def _border_mask(height: int, width: int, pad: int, like: Tensor) -> Tensor:
    """(1, 1, H + 2p, W + 2p): 1 on the padding ring, 0 inside."""
    mask = torch.ones(1, 1, height + 2 * pad, width + 2 * pad, dtype=like.dtype, device=like.device)
    mask[..., pad:pad + height, pad:pad + width] = 0
    return mask


def _padding_term_conv(weight: Tensor, shift: Tensor, height: int, width: int, pad: int,
                       stride: tuple[int, int]) -> Tensor:
    """conv(pad(z, shift)) - conv(pad(z, 0)): what the bias-valued padding adds, shape (1, C_out, Ho, Wo).

    Input-independent: the per-channel pad values contracted with the kernel, convolved with the
    padding ring.  Differentiable w.r.t. ``weight``; ``shift`` is detached (as in ``BNAndPad``).
    """
    shift = shift.to(weight.dtype)
    ring_kernel = torch.einsum("ocuv,c->ouv", weight, shift).unsqueeze(1)  # (C_out, 1, k, k)
    return F.conv2d(_border_mask(height, width, pad, weight), ring_kernel, None, stride)


def _avg_pool_zero_padded(z: Tensor, k: int, s: int, pad: int, box_filter: bool | None = None) -> Tensor:
    """avg_pool(pad(z, 0), k, s) with divisor k*k.

    On the CPU (outside autocast; ``box_filter=None``) as a depthwise conv with a constant 1/k^2
    kernel: the same sum, ~2.5x faster forward+backward there than ``avg_pool2d`` (whose CPU kernels
    are slow), and its input is not kept for backward.
    """
    if box_filter is None:
        box_filter = z.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if box_filter:
        box = torch.full((z.shape[1], 1, k, k), 1.0 / (k * k), dtype=z.dtype, device=z.device)
        return _BoxFilter.apply(z, box, s, pad)
    if 2 * pad <= k:
        return F.avg_pool2d(z, k, s, pad, count_include_pad=True)
    return F.avg_pool2d(F.pad(z, [pad] * 4), k, s, 0)  # avg_pool2d refuses padding > k / 2


class _BoxFilter(torch.autograd.Function):
    """Depthwise conv with a constant kernel that, unlike ``F.conv2d``, does not keep its input
    alive for backward (the input gradient needs only the kernel)."""

    @staticmethod
    def forward(ctx, z: Tensor, box: Tensor, stride: int, pad: int) -> Tensor:
        ctx.input_shape, ctx.stride, ctx.pad = z.shape, stride, pad
        ctx.save_for_backward(box)
        return F.conv2d(z, box, None, stride, pad, 1, box.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (box,) = ctx.saved_tensors
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, box, grad, ctx.stride, ctx.pad, 1, box.shape[0])
        return grad_input, None, None, None


def _padding_term_avg(shift: Tensor, height: int, width: int, pad: int, k: int, s: int, like: Tensor) -> Tensor:
    """avg_pool(pad(z, shift)) - avg_pool(pad(z, 0)), shape (1, C, Ho, Wo)."""
    fraction = F.avg_pool2d(_border_mask(height, width, pad, like), k, s, 0)
    return shift.to(like.dtype).reshape(1, -1, 1, 1) * fraction


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
    if kh != kw or kh <= 1 or kh % 2 == 0 or sh != sw or ph != pw or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
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
        branch.bn.weight.fill_(init_gamma)
        branch.bn.bias.zero_()


def new_branch_batchnorms(block: DiverseBranchBlock) -> list[nn.BatchNorm2d]:
    """BatchNorms of every non-kxk branch (the ones BN recalibration must fill)."""
    return [m for name, b in block.branches.items() if name != KXK for m in b.modules()
            if isinstance(m, nn.BatchNorm2d)]
