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
from collections.abc import Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from . import dbb_fused
from . import transforms as T
from .block_base import RepBlock, plain_conv_like, take_conv
from .dbb_branches import (
    BRANCH_BUILDERS,
    BlockGeometry,
    Branch,
    ConvBN,
)
from .geometry import (
    BRANCH_NAMES,
    DEFAULT_INIT_GAMMA,
    KXK,
    ORIG_BIAS_ATTR,
)

BLOCK_TYPE = "bn"
# Structure-graph entry type: the bn block's entries predate the online block.
GRAPH_ENTRY_TYPE = "dbb"


class DiverseBranchBlock(RepBlock):
    """A kxk conv as a sum of diverse branches; see module docstring.

    ``branches`` selects which branches exist (default: every branch the geometry
    allows).  New modules are created on ``device``/``dtype``.  Parameters of new
    branches are left at PyTorch defaults: :meth:`init_new_branches` applies DyRep's
    initialization.
    """

    block_type: ClassVar[str] = BLOCK_TYPE
    graph_entry_type: ClassVar[str] = GRAPH_ENTRY_TYPE

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
        names = self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, groups, branches)
        setattr(self, ORIG_BIAS_ATTR, orig_bias)
        geometry = BlockGeometry(in_channels, out_channels, kernel_size, stride, self.padding, groups,
                                 {"device": device, "dtype": dtype})
        for name in BRANCH_NAMES:  # canonical order keeps state_dict order stable
            if name in names:
                self.branches[name] = BRANCH_BUILDERS[name](geometry, kxk_conv)

    # ------------------------------------------------------------------ forward
    def forward_branches(self, x: Tensor) -> Tensor:
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
    def kxk_branch(self) -> ConvBN:
        return cast(ConvBN, self.branches[KXK])

    def branch_gate(self, name: str) -> Tensor:
        """The gamma of branch ``name``'s last BN."""
        return cast(Branch, self.branches[name]).bn.weight

    def branches_equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        kernels, biases = [], []
        for branch in self.branches.values():
            k, b = cast(Branch, branch).equivalent_kernel(self.kernel_size)
            kernels.append(k)
            biases.append(b)
        return T.sum_branches(kernels, biases)

    def branch_kernel(self, name: str) -> tuple[Tensor, Tensor]:
        return cast(Branch, self.branches[name]).equivalent_kernel(self.kernel_size)

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
        if isinstance(branch.conv, RepBlock):
            branch.conv.absorb(conv_delta, torch.zeros_like(bias))
        else:
            conv = cast(nn.Conv2d, branch.conv)  # a kxk conv that is not a nested block is a plain conv
            conv.weight.add_(conv_delta.to(conv.weight.dtype))
        bn.bias.add_(bias.to(bn.bias.dtype))

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
        if isinstance(branch.conv, RepBlock):
            if generator is None:
                raise ValueError("re-initialising a nested block in the kxk slot needs a generator")
            nested = branch.conv
            nested.init_new_branches(init_gamma, generator)
            nested.compensate_kxk(conv_kernel, torch.zeros_like(target_bias), generator, init_gamma)
        else:
            conv = cast(nn.Conv2d, branch.conv)  # a kxk conv that is not a nested block is a plain conv
            conv.weight.copy_(conv_kernel.to(conv.weight.dtype))
            if conv.bias is not None:
                residual_bias = residual_bias - conv.bias / std
        bn.bias.copy_(residual_bias.to(bn.bias.dtype))

    @torch.no_grad()
    def init_new_branches(self, init_gamma: float, generator: torch.Generator) -> None:
        """DyRep's init of the non-kxk branches: Kaiming-normal (fan-out) convs, last BN gamma=init_gamma.

        Random numbers are drawn on the CPU in float64 from ``generator`` and then cast,
        so every device/rank produces the same values for the same seed.
        """
        for name, branch in self.branches.items():
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

    # ------------------------------------------------------- construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, branches: Sequence[str] | None = None) -> DiverseBranchBlock:
        """A block whose kxk branch reuses ``conv`` (its bias removed: the caller keeps the target).

        Reusing the conv keeps its ``weight`` Parameter object, so optimizer state survives.
        """
        k, s, p, orig_bias, _ = take_conv(conv)
        w = conv.weight
        return cls(conv.in_channels, conv.out_channels, k, s, p, conv.groups, branches=branches,
                   kxk_conv=conv, orig_bias=orig_bias, device=w.device, dtype=w.dtype)

    @classmethod
    def from_description(cls, entry: dict, like: nn.Conv2d) -> DiverseBranchBlock:
        w = like.weight
        block = cls(entry["in_channels"], entry["out_channels"], entry["kernel_size"], entry["stride"],
                    entry["padding"], entry["groups"], branches=entry["branches"], orig_bias=entry["orig_bias"],
                    kxk_conv=plain_conv_like(like), device=w.device, dtype=w.dtype)
        if (block.in_channels, block.out_channels, block.groups) != (like.in_channels, like.out_channels,
                                                                    like.groups):
            raise ValueError("bn block geometry does not match the model's conv")
        return block


def block_from_conv(conv: nn.Conv2d, branches: Sequence[str] | None = None) -> DiverseBranchBlock:
    """:meth:`DiverseBranchBlock.from_conv`."""
    return DiverseBranchBlock.from_conv(conv, branches)
