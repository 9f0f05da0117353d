"""Online re-parameterized block (OREPA-style, Hu et al., CVPR 2022): a kxk conv whose kernel is a sum of
scaled branch kernels, assembled differentiably on every step and applied as **one** conv
(unless running the branches on the activations is estimated cheaper: wide convs on tiny activations).

Same branch set and geometry rules as :class:`~dyrep_ray.rep.dbb.DiverseBranchBlock`
(:func:`~dyrep_ray.rep.geometry.allowed_branches`), but no branch has a BatchNorm: each holds raw kernels
and a learnable per-output-channel ``scale``.  Branch ``b``'s kxk kernel contribution is

* ``1x1``      ``s * pad(W)``              * ``kxk``   ``s * W`` (``W`` of a conv, or of a nested block)
* ``1x1_kxk``  ``s * (W2 ∘ W1)``           * ``1xk`` / ``kx1``  ``s * pad(W)``
* ``1x1_avg``  ``s * W1 / k^2`` on every tap * ``identity``  ``s * I`` at the centre tap

and ``forward(x) = conv2d(x, Σ_b contribution_b, bias)``: one conv on the activations whatever the branch
count, so time and activation memory stay close to the plain conv's; only the kernel assembly (batch-size
independent) is extra.  Where that assembly would cost more than the convs themselves (a wide kernel on
tiny activations: the 1x1->kxk merge alone is out*mid*in*k^2 MACs), ``forward`` runs the 1x1->kxk branch on
the activations next to one conv with the other branches' kernel (``split``), or every branch on the
activations -- the same function, the path chosen by a MAC estimate once per input shape and recorded
(:meth:`OnlineBlock.path_for`; :attr:`OnlineBlock.forward_path` forces one).  On a map smaller than the
kernel's reach (a 3x3 conv on a 1x1 map) the assembled paths merge and apply only the taps that read input
(:meth:`OnlineBlock.used_taps`): the others only ever multiply zero padding.  Without BatchNorms the block
computes the same function in train and eval mode; deploy is the assembled kernel (:meth:`OnlineBlock.to_conv`).

On the assembled path the branch convs are never called as modules (their weights are read directly), so
hooks on them do not fire; hooks on the block itself do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import online_kernels as OK
from . import transforms as T
from .block_base import RepBlock, plain_conv_like, take_conv
from .geometry import BRANCH_NAMES, DEFAULT_INIT_GAMMA, KXK, ORIG_BIAS_ATTR, mid_channels_1x1_kxk
from .online_cost import AUTO_PATH, BRANCHES_PATH, KERNEL_PATH, SPLIT_BRANCH, SPLIT_PATH, activation_macs, path_costs

BLOCK_TYPE = "online"
GRAPH_ENTRY_TYPE = "online"  # structure-graph entry type
# Below this |scale| the kxk branch cannot absorb a cut branch without blowing up (same bound as the bn block).
MIN_ABSORB_SCALE = 1e-8


class OnlineBranch(Protocol):
    """What every branch module offers (for the type checker: ``ModuleDict`` values are plain modules)."""

    scale: nn.Parameter

    def contribution(self, crop: Crop | None = None) -> Tensor: ...

    def on_activations(self, x: Tensor, stride: int, padding: int, groups: int, window: int) -> Tensor: ...


#: Cuts a branch's kernel (natural size, centred in the block's kxk) to the taps a forward uses
#: (:func:`~dyrep_ray.rep.online_kernels.crop_to_taps` bound to the block's window).
Crop = Callable[[Tensor], Tensor]


def _conv_kernel(conv: nn.Module) -> Tensor:
    """Kernel of a plain bias-free conv, or the assembled kernel of a nested block."""
    return conv.assembled_kernel() if isinstance(conv, OnlineBlock) else cast(Tensor, conv.weight)


def _scale_param(channels: int, value: float, like: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.full((channels,), float(value), dtype=like.dtype, device=like.device))


class ScaledConv(nn.Module):
    """``scale * kernel(conv)``: the kxk, 1x1, 1xk and kx1 branches (``conv`` may be a nested block for kxk)."""

    def __init__(self, conv: nn.Module, out_channels: int, like: Tensor):
        super().__init__()
        self.conv = conv
        self.scale = _scale_param(out_channels, 1.0, like)

    def contribution(self, crop: Crop | None = None) -> Tensor:
        """This branch's scaled kernel at its natural size (centred in the block's kxk window), or ``crop`` of it."""
        kernel = _conv_kernel(self.conv)  # cut before scaling: no full-size temporary for a view to keep alive
        return OK.scale_kernel(kernel if crop is None else crop(kernel), self.scale)

    def on_activations(self, x: Tensor, stride: int, padding: int, groups: int, window: int) -> Tensor:
        """This branch's (unscaled) output on ``x``; the block's ``padding`` for its ``window`` x ``window``
        kernel, less the centring offset per kernel axis (centred branches exist only at padding k // 2)."""
        if isinstance(self.conv, OnlineBlock):
            return self.conv(x)
        kh, kw = cast(nn.Conv2d, self.conv).weight.shape[-2:]  # not a nested block: a plain conv
        pad = (padding - (window - kh) // 2, padding - (window - kw) // 2)
        return F.conv2d(x, cast(nn.Conv2d, self.conv).weight, None, stride, pad, 1, groups)


class ScaledOneByOneKxk(nn.Module):
    """``scale * (conv2 ∘ conv1)``: 1x1 (in -> mid) then kxk (mid -> out), both bias-free; ``conv2`` may be a
    nested block (DyRep grows it like the kxk branch's conv: padding 0, so the reduced branch set)."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, groups: int, out_channels: int, like: Tensor):
        super().__init__()
        self.groups = groups
        self.conv1, self.conv2 = conv1, conv2
        self.scale = _scale_param(out_channels, 1.0, like)

    def contribution(self, crop: Crop | None = None) -> Tensor:
        # Cut and scale the kxk factor first: one kernel-sized temporary in all, and a merge of only the taps used.
        kxk = _conv_kernel(self.conv2)
        return OK.merge_1x1_kxk_kernel(self.conv1.weight, OK.scale_kernel(kxk if crop is None else crop(kxk),
                                                                          self.scale), self.groups)

    def on_activations(self, x: Tensor, stride: int, padding: int | tuple[int, int], groups: int, window: int,
                       crop: Crop | None = None) -> Tensor:
        # Bias-free 1x1: zero padding its output is exact (a nested conv2 is bias-free too: its conv had none).
        kxk = _conv_kernel(self.conv2)
        return F.conv2d(F.conv2d(x, self.conv1.weight, None, 1, 0, 1, groups), kxk if crop is None else crop(kxk),
                        None, stride, padding, 1, groups)


class ScaledOneByOneAvg(nn.Module):
    """``scale * (avg_pool_kxk ∘ conv1)``."""

    def __init__(self, conv1: nn.Conv2d, kernel_size: int, out_channels: int, like: Tensor):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = conv1
        self.scale = _scale_param(out_channels, 1.0, like)

    def contribution(self, crop: Crop | None = None) -> Tensor:
        kernel = OK.avg_branch_kernel(OK.scale_kernel(self.conv1.weight, self.scale), self.kernel_size)
        return kernel if crop is None else crop(kernel)

    def on_activations(self, x: Tensor, stride: int, padding: int, groups: int, window: int) -> Tensor:
        y, k = F.conv2d(x, self.conv1.weight, None, 1, 0, 1, groups), self.kernel_size
        if 2 * padding <= k:
            return F.avg_pool2d(y, k, stride, padding, count_include_pad=True)
        return F.avg_pool2d(F.pad(y, [padding] * 4), k, stride, 0)  # avg_pool2d refuses padding > k / 2


class ScaledIdentity(nn.Module):
    """``scale * I``: the identity branch (in == out channels, stride 1); no kernel parameters."""

    eye: Tensor  # a buffer (registered in __init__)

    def __init__(self, channels: int, groups: int, like: Tensor):
        super().__init__()
        self.scale = _scale_param(channels, 1.0, like)
        # Not in the state_dict: a constant of the geometry, rebuilt by the constructor.
        self.register_buffer("eye", OK.identity_matrix(channels, groups, like), persistent=False)

    def contribution(self, crop: Crop | None = None) -> Tensor:
        return OK.scale_kernel(self.eye if crop is None else crop(self.eye), self.scale)

    def on_activations(self, x: Tensor, stride: int, padding: int, groups: int, window: int) -> Tensor:
        return x


def _branch_convs(branch: nn.Module) -> list[nn.Conv2d]:
    return [m for m in branch.children() if isinstance(m, nn.Conv2d)]


class OnlineBlock(RepBlock):
    """A kxk conv as a sum of scaled branch kernels; see the module docstring.

    ``branches`` selects which branches exist (default: every branch the geometry allows).  ``kxk_conv``
    (bias-free ``nn.Conv2d`` or nested :class:`OnlineBlock`) becomes the kxk branch's conv; ``bias`` (a
    Parameter, or None) the block's bias.  New branch parameters are left at PyTorch defaults and every
    scale at 1: :meth:`init_new_branches` applies DyRep's initialization.
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
        bias: nn.Parameter | bool | None = None,
        orig_bias: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        names = self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, groups, branches)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        # "kernel": always one conv with the assembled kernel; "branches": always every branch on the
        # activations; "auto": whichever _cheaper_on_activations estimates cheaper.  Not state: a speed
        # knob, the function is the same.
        self.forward_path = AUTO_PATH
        # "auto"'s decision per (input shape, branch set): a speed cache, not state (see path_for)
        self.chosen_paths: dict[tuple, str] = {}
        k, s, p, g = kernel_size, stride, self.padding, groups
        kw = dict(device=device, dtype=dtype)
        if kxk_conv is None:
            kxk_conv = nn.Conv2d(in_channels, out_channels, k, s, p, groups=g, bias=False, **kw)
        like = _conv_kernel(kxk_conv).detach()
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        elif bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, dtype=like.dtype, device=like.device))
        else:
            self.register_parameter("bias", None)
        setattr(self, ORIG_BIAS_ATTR, self.bias is not None if orig_bias is None else bool(orig_bias))
        branch: nn.Module
        for name in BRANCH_NAMES:  # canonical order keeps state_dict order stable
            if name not in names:
                continue
            if name == KXK:
                branch = ScaledConv(kxk_conv, out_channels, like)
            elif name == "1x1":
                branch = ScaledConv(nn.Conv2d(in_channels, out_channels, 1, s, 0, groups=g, bias=False, **kw),
                                    out_channels, like)
            elif name == "1x1_kxk":
                mid = mid_channels_1x1_kxk(in_channels, out_channels, g)
                branch = ScaledOneByOneKxk(nn.Conv2d(in_channels, mid, 1, groups=g, bias=False, **kw),
                                           nn.Conv2d(mid, out_channels, k, s, groups=g, bias=False, **kw),
                                           g, out_channels, like)
            elif name == "1x1_avg":
                branch = ScaledOneByOneAvg(nn.Conv2d(in_channels, out_channels, 1, groups=g, bias=False, **kw),
                                           k, out_channels, like)
            elif name == "1xk":
                branch = ScaledConv(nn.Conv2d(in_channels, out_channels, (1, k), s, (0, p), groups=g, bias=False,
                                              **kw), out_channels, like)
            elif name == "kx1":
                branch = ScaledConv(nn.Conv2d(in_channels, out_channels, (k, 1), s, (p, 0), groups=g, bias=False,
                                              **kw), out_channels, like)
            else:  # identity
                branch = ScaledIdentity(in_channels, g, like)
            self.branches[name] = branch

    # ------------------------------------------------------------------ forward
    def assembled_kernel(self, skip: str | None = None, taps: OK.TapWindow | None = None) -> Tensor:
        """Σ branches' kernel contributions (differentiable): the one kernel :meth:`forward` applies
        (without branch ``skip``'s: the split path runs that branch on the activations); only the ``taps`` window
        of it if given (:meth:`used_taps`), each branch cut to it before any merge."""
        if self.fused_conv is not None:  # folded in place by reparameterize()
            weight = self.fused_conv.weight
            return weight if taps is None else weight[..., taps[0]:taps[1], taps[2]:taps[3]]
        if taps is not None:
            crop = self._crop(taps)
            parts = [cast(OnlineBranch, branch).contribution(crop) for name, branch in self.branches.items()
                     if name != skip]
            return functools.reduce(torch.add, parts)
        acc = cast(OnlineBranch, self.branches[KXK]).contribution()  # a fresh product: safe to add into
        smaller: dict[tuple[int, ...], Tensor] = {}  # 1x1 / 1xk / kx1 contributions, summed per shape
        for name, branch in self.branches.items():
            if name in (KXK, skip):
                continue
            part = cast(OnlineBranch, branch).contribution()
            if part.shape[-2:] == acc.shape[-2:]:
                acc.add_(part)
            else:
                shape = tuple(part.shape[-2:])
                smaller[shape] = part if shape not in smaller else smaller[shape] + part
        # One zero-pad per shape, added out of a view-free in-place add (no full-kernel copies in backward).
        for part in smaller.values():
            acc.add_(T.pad_kernel_to(part, self.kernel_size))
        return acc

    def forward_branches(self, x: Tensor) -> Tensor:
        path = self.path_for(x)
        if path == BRANCHES_PATH:
            return self._forward_on_activations(x)
        # The assembled paths run only the taps that read input on this map (all of them but on maps smaller than
        # the kernel's reach): the same output, without the work the other taps spend on zero padding.
        taps = self.used_taps(x)
        padding = self.padding if taps is None else (self.padding - taps[0], self.padding - taps[2])
        if path == SPLIT_PATH:
            split = cast(ScaledOneByOneKxk, self.branches[SPLIT_BRANCH])
            out = F.conv2d(x, self.assembled_kernel(skip=SPLIT_BRANCH, taps=taps), self.bias, self.stride, padding,
                           1, self.groups)
            y = split.on_activations(x, self.stride, padding, self.groups, self.kernel_size,
                                     None if taps is None else self._crop(taps))
            return torch.addcmul(out, y, split.scale.reshape(1, -1, 1, 1))
        return F.conv2d(x, self.assembled_kernel(taps=taps), self.bias, self.stride, padding, 1, self.groups)

    def used_taps(self, x: Tensor) -> OK.TapWindow | None:
        """The window of kernel taps that read input (not only padding) on ``x``'s map, if some never do
        (:func:`~dyrep_ray.rep.online_kernels.used_taps`: a 3x3 conv on a 1x1 map uses only its centre)."""
        return OK.used_taps(int(x.shape[-2]), int(x.shape[-1]), self.kernel_size, self.stride, self.padding)

    def _crop(self, taps: OK.TapWindow) -> Crop:
        return partial(OK.crop_to_taps, k=self.kernel_size, window=taps)

    def _forward_on_activations(self, x: Tensor) -> Tensor:
        """The same function, every branch run on ``x`` and its output scaled (no BN: zero padding exact)."""
        out = None
        for module in self.branches.values():
            branch = cast(OnlineBranch, module)
            y = branch.on_activations(x, self.stride, self.padding, self.groups, self.kernel_size)
            y = y * branch.scale.reshape(1, -1, 1, 1)
            out = y if out is None else out + y
        assert out is not None  # a block always holds its kxk branch
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)

    def takes_kernel_path(self, x: Tensor) -> bool:
        """True if :meth:`forward` on ``x`` runs one conv with the assembled kernel."""
        return self.path_for(x) == KERNEL_PATH

    def path_for(self, x: Tensor) -> str:
        """The path :meth:`forward` takes on an input of ``x``'s shape: ``forward_path`` unless "auto", else
        the cheapest by :meth:`path_costs`.  Decided once per (input shape, branch set) and recorded in
        ``chosen_paths``: a step only looks the decision up."""
        if self.forward_path != AUTO_PATH:
            return self.forward_path
        key = (tuple(x.shape), tuple(self.branches.keys()), self._nested_signature())
        path = self.chosen_paths.get(key)
        if path is None:
            costs = self.path_costs(x)
            path = self.chosen_paths[key] = min(costs, key=costs.__getitem__)
        return path

    def _nested_signature(self) -> tuple:
        """Nested blocks change the split branch's cost: part of the recorded decision's key."""
        return tuple(type(m).__name__ for m in self.branches.modules() if isinstance(m, OnlineBlock))

    def activation_macs(self, x: Tensor) -> int:
        """Multiply-accumulates of the convs :meth:`forward` runs on ``x`` (the usual per-forward count):
        :func:`~dyrep_ray.rep.online_cost.activation_macs` on the path it takes."""
        path = self.path_for(x)
        return activation_macs(self, x, path, None if path == BRANCHES_PATH else self.used_taps(x))

    def _cheaper_on_activations(self, x: Tensor) -> bool:
        """True if running every branch on ``x`` is estimated cheaper than the assembled kernel."""
        costs = self.path_costs(x)
        return costs[BRANCHES_PATH] < costs[KERNEL_PATH]

    def path_costs(self, x: Tensor) -> dict[str, int]:
        """:func:`~dyrep_ray.rep.online_cost.path_costs` of this block on ``x``'s shape."""
        return path_costs(self, x)

    # ------------------------------------------------------------- the algebra
    @property
    def kxk_branch(self) -> ScaledConv:
        return cast(ScaledConv, self.branches[KXK])

    def branch_gate(self, name: str) -> Tensor:
        """Branch ``name``'s per-channel scale."""
        return cast(OnlineBranch, self.branches[name]).scale

    def _bias_or_zeros(self, like: Tensor) -> Tensor:
        return self.bias if self.bias is not None else torch.zeros(self.out_channels, dtype=like.dtype,
                                                                   device=like.device)

    def branches_equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """Kernel and bias of the single conv this block equals (in train and eval mode)."""
        kernel = self.assembled_kernel()
        return kernel, self._bias_or_zeros(kernel)

    def branch_kernel(self, name: str) -> tuple[Tensor, Tensor]:
        """Branch ``name``'s contribution to :meth:`equivalent_kernel` (its bias part is zero)."""
        kernel = T.pad_kernel_to(cast(OnlineBranch, self.branches[name]).contribution(), self.kernel_size).contiguous()
        return kernel, torch.zeros_like(kernel[:, 0, 0, 0])

    @torch.no_grad()
    def absorb(self, kernel: Tensor, bias: Tensor) -> None:
        """Add ``conv(x; kernel) + bias`` to this block's function via its kxk branch."""
        scale = self.kxk_scale()
        if bool((scale.abs() < MIN_ABSORB_SCALE).any()):
            raise ValueError("kxk branch has a ~zero scale; cannot absorb a branch into it")
        conv_delta = kernel / scale.reshape(-1, 1, 1, 1)
        conv = self.kxk_branch.conv
        if isinstance(conv, OnlineBlock):
            conv.absorb(conv_delta, torch.zeros_like(bias))
        else:
            weight = cast(Tensor, conv.weight)  # a plain conv
            weight.add_(conv_delta.to(weight.dtype))
        if self.bias is not None:
            self.bias.add_(bias.to(self.bias.dtype))
        elif bool((bias != 0).any()):
            raise ValueError("this block has no bias; it cannot absorb a nonzero bias")

    def deploy_has_bias(self) -> bool:
        """The conv keeps the bias layout of the conv this block replaced (branches carry no shifts, so unlike
        the bn block no bias ever has to be folded elsewhere)."""
        return self.bias is not None

    def drop_branches(self) -> None:
        super().drop_branches()
        self.register_parameter("bias", None)  # now the fused conv's

    def forward_macs(self, x: Tensor) -> int | None:
        """:meth:`activation_macs` (the branch convs never run as modules); None once folded in place."""
        return None if self.fused_conv is not None else self.activation_macs(x)

    @torch.no_grad()
    def compensate_kxk(self, target_kernel: Tensor, target_bias: Tensor, generator: torch.Generator | None = None,
                       init_gamma: float = DEFAULT_INIT_GAMMA) -> None:
        """Set the kxk branch (scale 1, kernel = target − Σ other branches) so the block equals the target conv.

        A nested block in the kxk slot is re-initialised (its non-kxk branches drawn from ``generator``,
        scales ``init_gamma``) and compensated recursively to the kernel the kxk conv must have.
        """
        conv = self.kxk_branch.conv
        if isinstance(conv, OnlineBlock) and generator is None:
            raise ValueError("re-initialising a nested block in the kxk slot needs a generator "
                             "(grow happens before nesting)")
        others = torch.zeros_like(target_kernel)
        for name in self.branch_names:
            if name != KXK:
                others += self.branch_kernel(name)[0]
        self.kxk_scale().fill_(1.0)
        if isinstance(conv, OnlineBlock) and generator is not None:
            conv.init_new_branches(init_gamma, generator)
            conv.compensate_kxk(target_kernel - others, torch.zeros_like(target_bias), generator, init_gamma)
        else:
            weight = cast(Tensor, conv.weight)  # a plain conv (a nested block needed a generator: checked above)
            weight.copy_((target_kernel - others).to(weight.dtype))
        if self.bias is not None:
            self.bias.copy_(target_bias.to(self.bias.dtype))
        elif bool((target_bias != 0).any()):
            raise ValueError("this block has no bias; it cannot match a target conv with a nonzero bias")

    @torch.no_grad()
    def init_new_branches(self, init_gamma: float, generator: torch.Generator) -> None:
        """DyRep's init of the non-kxk branches: Kaiming-normal (fan-out) kernels, scale = ``init_gamma``.

        Random numbers are drawn on the CPU in float64 from ``generator`` and then cast, so every
        device/rank produces the same values for the same seed.
        """
        for name, branch in self.branches.items():
            if name == KXK:
                continue
            for conv in _branch_convs(branch):
                cpu = torch.empty(conv.weight.shape, dtype=torch.float64)
                nn.init.kaiming_normal_(cpu, mode="fan_out", nonlinearity="relu", generator=generator)
                conv.weight.copy_(cpu.to(conv.weight.dtype))
            cast(OnlineBranch, branch).scale.fill_(init_gamma)

    # ---------------------------------------------------------- description
    def describe_extra(self) -> dict:
        return {"bias": self.bias is not None}

    def describe(self) -> dict:
        """JSON-serializable block type + geometry + branch set: enough for :meth:`from_description`."""
        return {"type": BLOCK_TYPE, **super().describe()}

    @classmethod
    def from_description(cls, entry: dict, like: nn.Conv2d) -> OnlineBlock:
        """A block of ``entry``'s structure (from :meth:`describe`) replacing conv ``like`` (device, dtype and
        geometry checked against it); parameter values are whatever the state_dict loaded next sets."""
        if entry.get("type") != BLOCK_TYPE:
            raise ValueError(f"not an online block description (type {entry.get('type')!r})")
        geometry = (entry["in_channels"], entry["out_channels"], entry["groups"])
        if geometry != (like.in_channels, like.out_channels, like.groups):
            raise ValueError(f"online block geometry {geometry} does not match the model's conv "
                             f"{(like.in_channels, like.out_channels, like.groups)}")
        w, kxk = like.weight, plain_conv_like(like)
        return cls(entry["in_channels"], entry["out_channels"], entry["kernel_size"], entry["stride"],
                   entry["padding"], entry["groups"], branches=entry["branches"], kxk_conv=kxk,
                   bias=bool(entry["bias"]), orig_bias=bool(entry["orig_bias"]), device=w.device, dtype=w.dtype)


    @classmethod
    def from_conv(cls, conv: nn.Conv2d, branches: Sequence[str] | None = None) -> OnlineBlock:
        """A block whose kxk branch reuses ``conv`` and whose bias is ``conv``'s bias Parameter.

        Reusing the Parameter objects (weight, bias) keeps their optimizer state.  The kernel values are
        whatever :meth:`compensate_kxk` sets next.
        """
        k, s, p, orig_bias, bias = take_conv(conv)
        w = conv.weight
        return cls(conv.in_channels, conv.out_channels, k, s, p, conv.groups, branches=branches,
                   kxk_conv=conv, bias=bias, orig_bias=orig_bias, device=w.device, dtype=w.dtype)


def online_block_from_conv(conv: nn.Conv2d, branches: Sequence[str] | None = None) -> OnlineBlock:
    """:meth:`OnlineBlock.from_conv`."""
    return OnlineBlock.from_conv(conv, branches)


def grow_online_block(conv: nn.Conv2d, seed: int, init_gamma: float = DEFAULT_INIT_GAMMA,
                      branches: Sequence[str] | None = None) -> OnlineBlock:
    """An :class:`OnlineBlock` computing exactly ``conv``'s function (new branch scales = ``init_gamma``).

    The caller puts it where ``conv`` was; ``conv`` itself becomes the kxk branch's conv.
    """
    return cast(OnlineBlock, OnlineBlock.grow_from_conv(conv, seed, init_gamma, branches))
