"""Fold every block of a model back into plain convs (inference structure).

Both block types fold: a bn block into its eval-mode equivalent conv (always with a bias), an online
block into its assembled kernel (with a bias exactly when the conv it replaced had one).

A user's conv that had no bias gains one when it grows into a bn block (its branches' BNs have
shifts).  To keep the deployed state_dict loadable with ``strict=True`` into the
architecture the user started from, that bias is folded into the BatchNorm that
directly follows the conv (``running_mean -= bias``, exact in eval mode).  Where the static DBB baseline had
replaced that BatchNorm by an identity (the original's ``--dbb``), deploy first puts back a BatchNorm2d that is
the identity in eval mode (mean 0, var 1 - eps, gamma 1, beta 0); the conv's bias then folds into it as above.
"""

from __future__ import annotations

import copy
import logging
from typing import cast

import torch
from torch import Tensor, fx, nn

from ..errors import UserError
from .blocks import is_block
from .geometry import ORIG_BIAS_ATTR
from .paths import get_submodule, set_submodule
from .replaced_bn import ReplacedBatchNorm

logger = logging.getLogger(__name__)

# What symbolic tracing raises on models it cannot follow: control flow on a proxy (TraceError),
# len()/iteration/shape arithmetic on proxies (RuntimeError, TypeError), unsupported ops.
_FX_TRACE_ERRORS = (fx.proxy.TraceError, RuntimeError, TypeError, NotImplementedError)


class DeployError(UserError, ValueError):
    """The model cannot be folded into the user's original layout."""


def _conv_to_bn_successors(model: nn.Module) -> dict[str, str]:
    """Map conv path -> path of the BatchNorm that consumes its output and nothing else does.

    Uses torch.fx when the model is traceable; otherwise falls back to module order
    (the next BatchNorm2d registered under the same parent with matching width),
    which holds for torchvision/timm ConvNormAct-style layouts.
    """
    class _BNLeafTracer(fx.Tracer):  # BN subclasses (timm BatchNormAct2d) stay single call_module nodes
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)

    try:
        graph = _BNLeafTracer().trace(model)
    except _FX_TRACE_ERRORS as exc:  # fx cannot trace every model (data-dependent control flow)
        logger.debug("fx trace failed (%s); using module-order BN matching", exc)
        return _successors_by_module_order(model)
    modules = dict(model.named_modules())
    result = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules.get(users[0].target), nn.BatchNorm2d):
            result[node.target] = users[0].target
    return result


def _successors_by_module_order(model: nn.Module) -> dict[str, str]:
    result = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, nn.Conv2d) and i + 1 < len(children):
                nxt_name, nxt = children[i + 1]
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == child.out_channels:
                    prefix = f"{parent_name}." if parent_name else ""
                    result[prefix + name] = prefix + nxt_name
    return result


@torch.no_grad()
def _fold_bias_into_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert conv.bias is not None  # deploy folds only convs with a bias
    bias: Tensor = conv.bias.detach()
    running_mean = cast(Tensor, bn.running_mean)  # None only with track_running_stats=False
    running_mean.sub_(bias.to(running_mean.dtype))
    conv.register_parameter("bias", None)


def deploy(model: nn.Module, inplace: bool = False, keep_bias: bool = False) -> nn.Module:
    """Return ``model`` with every block (bn or online) replaced by one ``nn.Conv2d``.

    With ``keep_bias=False`` (default) convs regain the user's original bias layout,
    so ``deploy(m).state_dict()`` loads with ``strict=True`` into the untouched
    architecture.  Raises :class:`DeployError` naming the conv if that is impossible.
    """
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    if is_block(target):  # a bare block: the result is its conv
        conv = target.to_conv()
        if not keep_bias and getattr(conv, ORIG_BIAS_ATTR) is False and conv.bias is not None:
            raise DeployError("a bare block whose conv had no bias cannot drop its bias; use keep_bias=True")
        delattr(conv, ORIG_BIAS_ATTR)
        return conv.train(was_training)
    top_level = [(n, m) for n, m in target.named_modules() if is_block(m)
                 and not any(n.startswith(o + ".") for o in _outer_paths(target, n))]
    for path, block in top_level:
        conv = block.to_conv()
        set_submodule(target, path, conv)
    _restore_replaced_batchnorms(target)
    if not keep_bias:
        needs_fold = [n for n, m in target.named_modules() if isinstance(m, nn.Conv2d)
                      and m.bias is not None and getattr(m, ORIG_BIAS_ATTR, True) is False]
        if needs_fold:
            successors = _conv_to_bn_successors(target)
            for path in needs_fold:
                if path not in successors:
                    raise DeployError(
                        f"conv '{path}' gained a bias during DyRep training and no BatchNorm directly follows it; "
                        "deploy with keep_bias=True (the weights then need a conv with bias=True at that place)")
                _fold_bias_into_bn(cast(nn.Conv2d, get_submodule(target, path)),
                                   cast(nn.BatchNorm2d, get_submodule(target, successors[path])))
    for _, m in target.named_modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, ORIG_BIAS_ATTR):
            delattr(m, ORIG_BIAS_ATTR)
    target.train(was_training)
    return target


def _restore_replaced_batchnorms(model: nn.Module) -> None:
    """Put an eval-mode identity BatchNorm2d where the static DBB baseline had replaced one: the untouched
    architecture's layout (a conv bias folded next lands in its running mean)."""
    replaced = [n for n, m in model.named_modules() if isinstance(m, ReplacedBatchNorm)]
    if not replaced:
        return
    like = next(model.parameters())
    for path in replaced:
        try:
            bn = cast(ReplacedBatchNorm, get_submodule(model, path)).to_batchnorm(like.device, like.dtype)
        except ValueError as exc:
            raise DeployError(f"BatchNorm '{path}': {exc}; deploy with the block's BatchNorm kept") from None
        set_submodule(model, path, bn)


def _outer_paths(model: nn.Module, path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))
            if is_block(get_submodule(model, ".".join(parts[:i])))]


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """max |a(x) - b(x)| in eval mode (modes restored afterwards)."""
    modes = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        return float((a(x) - b(x)).abs().max())
    finally:
        a.train(modes[0])
        b.train(modes[1])
