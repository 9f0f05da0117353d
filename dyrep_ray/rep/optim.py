"""Optimizer surgery after a structure change.

Parameters that survive keep their state (momentum, Adam moments) because the
state is keyed by the Parameter object; removed ones drop theirs; new ones join
the param group they belong to with fresh (lazily created) state.  Each group's
parameters are then put in module order, as an optimizer built fresh on the new
structure lists them, so position-keyed optimizer checkpoints (``optimizer.state_dict()``,
Lightning's) restore every buffer onto its own parameter.  Group
hyper-parameters (lr, weight decay, ...) are untouched, so an LR scheduler that
holds the optimizer keeps its position.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.optim import Optimizer

logger = logging.getLogger(__name__)


def is_no_decay_param(name: str, param: nn.Parameter) -> bool:
    """timm's filter: biases and 1-D params (BN/LN affine) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups_for(model: nn.Module, weight_decay: float, filter_bias_and_bn: bool = True) -> list[dict]:
    """Two groups (decay / no-decay) as timm builds them, or one group when filtering is off."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not filter_bias_and_bn or weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for n, p in params if not is_no_decay_param(n, p)]
    no_decay = [p for n, p in params if is_no_decay_param(n, p)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _group_for_new_param(optimizer: Optimizer, name: str, param: nn.Parameter) -> dict:
    groups = optimizer.param_groups
    if len(groups) == 1:
        return groups[0]
    no_decay = [g for g in groups if g.get("weight_decay", 0.0) == 0.0]
    decay = [g for g in groups if g.get("weight_decay", 0.0) != 0.0]
    if no_decay and decay:
        return no_decay[0] if is_no_decay_param(name, param) else decay[0]
    return groups[0]


def sort_params_in_module_order(optimizer: Optimizer, model: nn.Module) -> None:
    """Sort every param group's parameters into ``model.parameters()`` order (in place).

    State is keyed by the Parameter object, so reordering a group's list keeps every buffer with
    its parameter.  ValueError if a group holds a parameter ``model`` does not own.
    """
    position = {id(p): i for i, p in enumerate(model.parameters())}
    for group in optimizer.param_groups:
        if any(id(p) not in position for p in group["params"]):
            raise ValueError("the optimizer holds parameters the model does not own; run optimizer surgery first")
        group["params"] = sorted(group["params"], key=lambda p: position[id(p)])


def update_optimizer(optimizer: Optimizer, model: nn.Module) -> dict[str, int]:
    """Make ``optimizer`` hold exactly the trainable parameters of ``model``, each group in module order.

    Returns counts ``{"kept", "removed", "added"}``.
    """
    live = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    held: set[int] = set()
    removed = 0
    for group in optimizer.param_groups:
        kept = []
        for p in group["params"]:
            if id(p) in live and id(p) not in held:
                kept.append(p)
                held.add(id(p))
            else:
                optimizer.state.pop(p, None)
                removed += 1
        group["params"] = kept
    added = 0
    for pid, (name, p) in live.items():
        if pid in held:
            continue
        _group_for_new_param(optimizer, name, p)["params"].append(p)
        added += 1
    sort_params_in_module_order(optimizer, model)
    counts = {"kept": len(held), "removed": removed, "added": added}
    logger.debug("optimizer surgery: %s", counts)
    return counts


def restart_state(optimizer: Optimizer, module: nn.Module, keep: tuple = ()) -> int:
    """Drop the optimizer state of ``module``'s parameters (except those in ``keep``): they restart as new
    parameters do (the original DyRep builds a grown block from new parameters).  Returns how many had state."""
    kept = {id(p) for p in keep if p is not None}
    dropped = 0
    for p in module.parameters():
        if id(p) not in kept and optimizer.state.pop(p, None) is not None:
            dropped += 1
    return dropped
