"""Count host synchronizations and collectives issued while a piece of code runs.

Two layers, both active inside :class:`SyncCounter`:

* Python API wrappers: ``Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__ / cpu / numpy``
  and every collective / point-to-point function of ``torch.distributed``;
* a ``TorchDispatchMode`` that sees the aten ops underneath, so a sync reached any other way is
  still counted: ``_local_scalar_dense`` (what ``item``/``bool``/``float`` lower to), ``nonzero``
  and ``equal`` (data-dependent output), copies from an accelerator to the host, and ``c10d`` ops.
"""

from __future__ import annotations

import collections
import functools
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

TENSOR_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}


class _OpWatcher(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.counter.op_syncs[name] += 1
        elif name.startswith("c10d::") or name.startswith("_c10d_functional::"):
            self.counter.op_collectives[name] += 1
        elif name in ("aten::_to_copy", "aten::copy_"):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors}
            target = kwargs.get("device") if kwargs else None
            if (target is not None and torch.device(target).type == "cpu" and "cpu" not in devices) or (
                    name == "aten::copy_" and tensors[0].device.type == "cpu" and len(devices) > 1):
                self.counter.op_syncs[name + "(to host)"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as c: ...``; then ``c.syncs`` / ``c.collectives`` (totals) and details."""

    def __init__(self):
        self.api_syncs: collections.Counter = collections.Counter()
        self.api_collectives: collections.Counter = collections.Counter()
        self.op_syncs: collections.Counter = collections.Counter()
        self.op_collectives: collections.Counter = collections.Counter()
        self._stack: ExitStack | None = None
        self._depth = 0

    def _wrap(self, owner, name: str, bucket: collections.Counter):
        original = getattr(owner, name, None)
        if original is None:
            return
        counter = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if counter._depth == 0:  # count the outermost call only (item() inside tolist() etc.)
                bucket[name] += 1
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        setattr(owner, name, wrapper)
        self._stack.callback(setattr, owner, name, original)

    def __enter__(self) -> SyncCounter:
        self._stack = ExitStack()
        for name in TENSOR_SYNC_METHODS:
            self._wrap(torch.Tensor, name, self.api_syncs)
        for name in COLLECTIVES:
            self._wrap(dist, name, self.api_collectives)
        self._stack.enter_context(_OpWatcher(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    @property
    def syncs(self) -> int:
        # An API call and the op it lowers to are the same sync: take the larger of the two views.
        return max(sum(self.api_syncs.values()), sum(self.op_syncs.values()))

    @property
    def collectives(self) -> int:
        return max(sum(self.api_collectives.values()), sum(self.op_collectives.values()))

    def details(self) -> dict:
        return {"api_syncs": dict(self.api_syncs), "op_syncs": dict(self.op_syncs),
                "api_collectives": dict(self.api_collectives), "op_collectives": dict(self.op_collectives)}
