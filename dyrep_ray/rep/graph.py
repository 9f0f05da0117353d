"""The structure graph: a JSON description of every structural change DyRep made to a model, and its
rebuild on a fresh base model (checkpoints store it as ``structure.json``)."""

from __future__ import annotations

from torch import nn

from .blocks import graph_entry_class, is_block
from .geometry import ORIG_BIAS_ATTR
from .paths import get_submodule, set_submodule
from .replaced_bn import GRAPH_ENTRY_TYPE as IDENTITY_BN
from .replaced_bn import ReplacedBatchNorm

GRAPH_VERSION = 1


def structure_graph(model: nn.Module) -> dict:
    """JSON-serializable description of every structural change made to ``model``.

    Entries are ordered outermost first: ``{"path", "type": "dbb", geometry..., "branches"}``
    for bn blocks, ``{"path", "type": "online", geometry..., "branches", "bias"}`` for online
    blocks (:meth:`OnlineBlock.describe`) and ``{"path", "type": "conv", "bias": true,
    "orig_bias": false}`` for plain convs that gained a bias when a block collapsed back into a conv, and
    ``{"path", "type": "identity_bn", "num_features", ...}`` for a BatchNorm the static DBB baseline replaced
    by an identity (:mod:`.replaced_bn`).
    """
    entries = []
    for name, module in model.named_modules():
        if is_block(module):
            entries.append({"path": name, "type": module.graph_entry_type, **module.describe()})
        elif isinstance(module, nn.Conv2d) and hasattr(module, ORIG_BIAS_ATTR):
            entries.append({"path": name, "type": "conv", "bias": module.bias is not None,
                            "orig_bias": bool(getattr(module, ORIG_BIAS_ATTR))})
        elif isinstance(module, ReplacedBatchNorm):
            entries.append({"path": name, "type": IDENTITY_BN, **module.describe()})
    entries.sort(key=lambda e: e["path"].count(".") if e["path"] else -1)
    return {"version": GRAPH_VERSION, "blocks": entries}


def restore_graph(model: nn.Module, graph: dict) -> nn.Module:
    """Rebuild on a fresh base model the structure described by ``graph`` (in place).

    Only the structure is rebuilt; load the state_dict (``strict=True``) afterwards.
    """
    if (not isinstance(graph, dict) or graph.get("version") != GRAPH_VERSION
            or not isinstance(graph.get("blocks"), list)):
        raise ValueError(f"not a dyrep structure graph (expected version {GRAPH_VERSION} with a 'blocks' list)")
    for entry in sorted(graph["blocks"], key=lambda e: e["path"].count(".")):
        path = entry["path"]
        try:
            current = get_submodule(model, path)
        except AttributeError as exc:
            raise ValueError(f"structure graph names module '{path}', which this model does not have") from exc
        if entry["type"] == IDENTITY_BN:
            if not isinstance(current, nn.BatchNorm2d):
                raise ValueError(f"structure graph expects a BatchNorm2d at '{path}', found {type(current).__name__}")
            try:
                set_submodule(model, path, ReplacedBatchNorm.from_description(entry, current))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"structure graph entry for '{path}' does not fit the model's BatchNorm: "
                                 f"{exc}") from exc
            continue
        if not isinstance(current, nn.Conv2d):
            raise ValueError(f"structure graph expects a Conv2d at '{path}', found {type(current).__name__}")
        w = current.weight
        cls = graph_entry_class(entry["type"])
        if cls is not None:
            try:
                block = cls.from_description(entry, current)
            except ValueError as exc:
                raise ValueError(f"structure graph entry for '{path}' does not fit the model's conv: {exc}") from exc
            set_submodule(model, path, block)
        elif entry["type"] == "conv":
            conv = nn.Conv2d(current.in_channels, current.out_channels,
                             current.kernel_size, current.stride,  # type: ignore[arg-type]  # (as above)
                             current.padding, groups=current.groups,  # type: ignore[arg-type]
                             bias=bool(entry["bias"]), device=w.device, dtype=w.dtype)
            setattr(conv, ORIG_BIAS_ATTR, bool(entry["orig_bias"]))
            set_submodule(model, path, conv)
        else:
            raise ValueError(f"unknown structure graph entry type {entry['type']!r} at '{path}'")
    return model
