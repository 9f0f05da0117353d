"""Loop-independent helpers for using :class:`dyrep_ray.rep.DyRep` in someone else's training loop."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..rep import structure_graph


def canonical_param_order(optimizer: Optimizer, model: nn.Module) -> None:
    """Sort every param group's parameters into ``model.named_parameters()`` order (in place).

    Optimizer surgery appends new parameters at the end of their group, so after a grow the
    group order no longer matches an optimizer built fresh on the same structure.  Index-based
    optimizer checkpoints (``optimizer.state_dict()``, Lightning's ``optimizer_states``) then
    restore momentum onto the wrong tensors.  Optimizer state is keyed by the Parameter object,
    so reordering a group's list is free and keeps every buffer with its parameter.
    """
    position = {id(p): i for i, p in enumerate(model.parameters())}
    for group in optimizer.param_groups:
        if any(id(p) not in position for p in group["params"]):
            raise ValueError("the optimizer holds parameters the model does not own; run optimizer surgery first")
        group["params"] = sorted(group["params"], key=lambda p: position[id(p)])


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def replica_digest(model: nn.Module, *, buffers: bool = True) -> str:
    """sha256 over the structure graph and every tensor's bytes: equal digests = identical replicas.

    With ``buffers=False`` only parameters count: BN running statistics legitimately differ
    between DDP ranks after a forward pass (DDP re-broadcasts rank 0's buffers at the next one).
    """
    h = hashlib.sha256(json.dumps(structure_graph(model), sort_keys=True).encode())
    tensors = model.state_dict().items() if buffers else model.named_parameters()
    for name, tensor in tensors:
        h.update(name.encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def optimizer_state_digest(optimizer: Optimizer, model: nn.Module) -> str:
    """sha256 over every parameter's optimizer state keyed by parameter *name*, not position:
    equal before a save and after a resume only if each buffer came back to its own parameter."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            h.update(f"{name}:{key}".encode())
            h.update(_tensor_bytes(value) if torch.is_tensor(value) else repr(value).encode())
    return h.hexdigest()
