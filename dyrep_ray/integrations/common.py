"""Loop-independent helpers for using :class:`dyrep_ray.rep.DyRep` in someone else's training loop."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..rep import structure_graph
from ..rep.optim import sort_params_in_module_order


def canonical_param_order(optimizer: Optimizer, model: nn.Module) -> None:
    """Sort every param group's parameters into ``model.parameters()`` order (in place).

    Kept for callers written before :func:`~dyrep_ray.rep.optim.update_optimizer` (which every
    ``DyRep.apply(plan, optimizer)`` runs) did this itself: after DyRep's surgery it changes nothing.
    Still useful after surgery of one's own.
    """
    sort_params_in_module_order(optimizer, model)


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
