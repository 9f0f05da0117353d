"""The contract every DyRep block type implements (:class:`RepBlock`), and what they share.

A block is a kxk conv re-expressed as a sum of branches (names and geometry rules in :mod:`.geometry`), each
with a per-output-channel gate: the bn block's last BatchNorm gamma, the online block's scale.  The
controller, deploy, the structure graph and timm use only this class's methods, so a new block type is one
module with a subclass plus one line in :mod:`.blocks`' registry.

Folding, with timm's two contracts (``timm.utils.reparameterize_model`` prefers the first):

* :meth:`RepBlock.fuse` returns a new ``nn.Conv2d`` computing the block's eval-mode function; the caller
  puts it where the block was (the block itself is unchanged);
* :meth:`RepBlock.reparameterize` folds the block in place and returns nothing: its branches are dropped and
  it forwards through that conv (inference only: no grow, cut or describe afterwards).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from .geometry import CUT_MODES, DEFAULT_INIT_GAMMA, KXK, ORIG_BIAS_ATTR, block_branch_names, conv_geometry


class RepBlock(nn.Module, abc.ABC):
    """A kxk conv as a sum of gated branches in ``self.branches`` (a ``ModuleDict`` that always holds ``kxk``).

    Subclasses set ``block_type`` (the registry / ``--dyrep-block`` name), ``graph_entry_type`` (the
    structure-graph entry type, kept stable so old ``structure.json`` files load) and implement the abstract
    methods: the type-specific maths.
    """

    block_type: ClassVar[str]
    graph_entry_type: ClassVar[str]

    branches: nn.ModuleDict
    fused_conv: nn.Conv2d | None
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int

    def _init_geometry(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                       padding: int | None, groups: int, branches: Sequence[str] | None) -> tuple[str, ...]:
        """Set the conv hyper-parameters and return the branch names to build (validated)."""
        padding, names = block_branch_names(in_channels, out_channels, kernel_size, stride, padding, branches,
                                            type(self).__name__)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.fused_conv = None  # set by reparameterize()
        self.branches = nn.ModuleDict()
        return names

    # ------------------------------------------------------------------ type-specific
    @abc.abstractmethod
    def forward_branches(self, x: Tensor) -> Tensor:
        """The block's forward while it has branches (not folded by :meth:`reparameterize`)."""

    @abc.abstractmethod
    def branch_gate(self, name: str) -> Tensor:
        """Per-output-channel gate of branch ``name`` (bn block: its last BN's gamma; online block: its scale)."""

    @abc.abstractmethod
    def branch_kernel(self, name: str) -> tuple[Tensor, Tensor]:
        """Branch ``name``'s (kernel, bias) contribution to :meth:`equivalent_kernel` (kxk-sized)."""

    @abc.abstractmethod
    def branches_equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the one conv the branches equal (eval mode)."""

    @abc.abstractmethod
    def absorb(self, kernel: Tensor, bias: Tensor) -> None:
        """Add ``conv(x; kernel) + bias`` to this block's eval-mode function via its kxk branch."""

    @abc.abstractmethod
    def compensate_kxk(self, target_kernel: Tensor, target_bias: Tensor, generator: torch.Generator | None = None,
                       init_gamma: float = DEFAULT_INIT_GAMMA) -> None:
        """Set the kxk branch so the block's eval-mode function equals the target conv; a nested block in the
        kxk slot is re-initialised (branches drawn from ``generator``, gates ``init_gamma``) and compensated."""

    @abc.abstractmethod
    def init_new_branches(self, init_gamma: float, generator: torch.Generator) -> None:
        """DyRep's init of the non-kxk branches: Kaiming-normal (fan-out) kernels, gates ``init_gamma``; drawn on
        the CPU in float64 from ``generator`` and cast, so every device/rank gets the same values."""

    @classmethod
    @abc.abstractmethod
    def from_conv(cls, conv: nn.Conv2d, branches: Sequence[str] | None = None) -> RepBlock:
        """A block whose kxk branch reuses ``conv`` (its Parameters keep their optimizer state); values are
        whatever :meth:`compensate_kxk` or an init sets next."""

    @classmethod
    @abc.abstractmethod
    def from_description(cls, entry: dict, like: nn.Conv2d) -> RepBlock:
        """A block of ``entry``'s structure (from :meth:`describe`) replacing conv ``like``; parameter values
        are whatever the state_dict loaded next sets.  A geometry that does not match ``like`` is a
        ValueError."""

    def deploy_has_bias(self) -> bool:
        """Whether the conv :meth:`to_conv` builds has a bias (bn block: always, its BNs have shifts)."""
        return True

    def describe_extra(self) -> dict:
        """Type-specific entries of :meth:`describe` (placed after ``branches``)."""
        return {}

    def forward_macs(self, x: Tensor) -> int | None:
        """MACs this block's forward runs on ``x`` that no hook on an inner ``nn.Conv2d`` sees, or None when
        its convs run as modules (then they count themselves)."""
        return None

    # ------------------------------------------------------------------ shared
    def forward(self, x: Tensor) -> Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(x)
        return self.forward_branches(x)

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    @property
    def kxk_branch(self) -> nn.Module:
        return self.branches[KXK]

    @property
    def is_fused(self) -> bool:
        return self.fused_conv is not None

    def kxk_scale(self) -> Tensor:
        """Per-channel gate of the kxk branch: the reference of :meth:`branch_importance`, and what a cut with
        ``mode="absorb"`` divides by (so it must be away from zero)."""
        return self.branch_gate(KXK)

    def branch_importance(self) -> dict[str, Tensor]:
        """mean|gate| of each branch relative to the kxk branch's (kxk == 1)."""
        ref = self.kxk_scale().detach().abs().mean()
        return {n: self.branch_gate(n).detach().abs().mean() / ref for n in self.branches}

    def equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv this block equals in eval mode."""
        conv = self.fused_conv
        if conv is None:
            return self.branches_equivalent_kernel()
        bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
        return conv.weight, bias

    @torch.no_grad()
    def cut(self, names: Iterable[str], mode: str = "reset", seed: int = 0,
            init_gamma: float = DEFAULT_INIT_GAMMA) -> None:
        """Remove branches, keeping the block's eval-mode function exactly.

        ``mode="reset"`` (the original DyRep, and the DyRep controller's default): surviving non-kxk branches
        keep their state; the kxk gate is reset (bn block: BN gamma=1, beta=0, fresh running stats; online
        block: scale 1) and the kxk conv set to the block minus the remaining branches.  A nested block in the
        kxk slot has its non-kxk branches re-initialised (seeded by ``seed``, gates ``init_gamma``) and its own
        kxk compensated.  ``mode="absorb"``: each cut branch's kernel is folded into the kxk branch (divided by
        the kxk gate, which is kept).
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
        target_kernel, target_bias = (t.detach().clone() for t in self.equivalent_kernel())
        for name in names:
            del self.branches[name]
        self.compensate_kxk(target_kernel, target_bias, torch.Generator().manual_seed(int(seed)), init_gamma)

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` computing this block's eval-mode function (marked with the user's bias layout)."""
        kernel, bias = self.equivalent_kernel()
        has_bias = self.fused_conv.bias is not None if self.fused_conv is not None else self.deploy_has_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         groups=self.groups, bias=has_bias, device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        if conv.bias is not None:
            conv.bias.copy_(bias)
        setattr(conv, ORIG_BIAS_ATTR, getattr(self, ORIG_BIAS_ATTR))
        return conv

    def fuse(self) -> nn.Conv2d:
        """timm's re-parameterization contract: the module that replaces this block.

        ``timm.utils.reparameterize_model`` calls ``child.fuse()`` and puts the result in the parent, so every
        block (nested ones inside it included) folds into one conv.
        """
        return self.to_conv()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold this block in place (timm's other contract: returns nothing): the branches are dropped and the
        block forwards through one conv, :meth:`to_conv`'s.  Inference only: a folded block can be deployed or
        folded into an outer block, not grown, cut or described.  Use :meth:`fuse` for a separate conv."""
        if self.fused_conv is not None:
            return
        conv = self.to_conv()
        conv.train(self.training)
        self.drop_branches()
        self.fused_conv = conv

    def drop_branches(self) -> None:
        """Remove every branch parameter (after :meth:`reparameterize` built the conv that replaces them)."""
        self.branches = nn.ModuleDict()

    def new_branch_batchnorms(self) -> list[nn.BatchNorm2d]:
        """BatchNorms of every non-kxk branch (the ones BN recalibration must fill after a grow)."""
        return [m for name, b in self.branches.items() if name != KXK for m in b.modules()
                if isinstance(m, nn.BatchNorm2d)]

    @torch.no_grad()
    def init_dbb_branches(self, generator: torch.Generator, fresh_kxk: bool = False) -> None:
        """Standard DBB init (Ding et al.'s block as constructed): every new conv drawn like a fresh
        ``nn.Conv2d`` (Kaiming-uniform, a=sqrt(5)), every BN gamma=1, beta=0, fresh statistics, every gate 1.

        The kxk conv keeps its weight unless ``fresh_kxk`` (then it is drawn like the others: the original's
        ``--dbb`` builds the whole block new).  Values are drawn on the CPU in float64 from ``generator`` and
        cast, so every rank builds the same block.
        """
        for name, branch in self.branches.items():
            for module in branch.modules():
                if isinstance(module, nn.Conv2d) and (name != KXK or fresh_kxk):
                    cpu = torch.empty(module.weight.shape, dtype=torch.float64)
                    nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
                    module.weight.copy_(cpu.to(module.weight.dtype))
                elif isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            self.branch_gate(name).fill_(1.0)

    @classmethod
    def grow_from_conv(cls, conv: nn.Conv2d, seed: int, init_gamma: float = DEFAULT_INIT_GAMMA,
                       branches: Sequence[str] | None = None,
                       place: Callable[[RepBlock], object] | None = None) -> RepBlock:
        """A block computing exactly ``conv``'s (eval-mode) function, new branch gates ``init_gamma``.

        ``conv`` becomes the kxk branch's conv.  ``place`` (if given) is called with the initialised block
        before the kxk compensation: where the caller puts it into its model and recalibrates its new BNs.
        """
        target_kernel, target_bias = conv_target(conv)
        block = cls.from_conv(conv, branches)
        block.train(conv.training)
        block.init_new_branches(init_gamma, torch.Generator().manual_seed(int(seed)))
        if place is not None:
            place(block)
        block.compensate_kxk(target_kernel, target_bias)
        return block

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.describe_extra().items())
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}{extra}, branches={self.branch_names}")

    def describe(self) -> dict:
        """JSON-serializable geometry + branch set (for the structure graph and :meth:`from_description`)."""
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
            **self.describe_extra(),
            "orig_bias": bool(getattr(self, ORIG_BIAS_ATTR)),
        }


@torch.no_grad()
def conv_target(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Copies of ``conv``'s kernel and bias (zeros without one): what a block grown from it must equal."""
    kernel = conv.weight.detach().clone()
    bias = (conv.bias.detach().clone() if conv.bias is not None
            else torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
    return kernel, bias


def take_conv(conv: nn.Conv2d) -> tuple[int, int, int, bool, nn.Parameter | None]:
    """(kernel, stride, padding, orig_bias, bias) of an eligible ``conv`` about to become a block's kxk conv;
    the bias Parameter is removed from ``conv`` (the block decides where it goes)."""
    geom = conv_geometry(conv)
    if geom is None:
        raise ValueError(f"conv {conv} is not eligible for growth (needs square k>1, no dilation, zero padding)")
    orig_bias = bool(getattr(conv, ORIG_BIAS_ATTR, conv.bias is not None))
    bias = cast("nn.Parameter | None", conv.bias)  # a conv's bias is a Parameter
    if bias is not None:
        conv.register_parameter("bias", None)
    if hasattr(conv, ORIG_BIAS_ATTR):
        delattr(conv, ORIG_BIAS_ATTR)
    return (*geom, orig_bias, bias)


def plain_conv_like(like: nn.Conv2d) -> nn.Conv2d:
    """A bias-free conv of ``like``'s geometry, device and dtype (values unset)."""
    w = like.weight
    # torch's stubs type a conv's kernel_size/stride/padding attributes as tuple[int, ...], the constructor
    # takes tuple[int, int]
    return nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride,  # type: ignore[arg-type]
                     like.padding, groups=like.groups, bias=False, device=w.device,  # type: ignore[arg-type]
                     dtype=w.dtype)
