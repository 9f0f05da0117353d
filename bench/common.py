"""Shared measurement helpers: interleaved timing, live-tensor memory, saved-tensor bytes, process group."""

from __future__ import annotations

import gc
import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ratio(samples_a: list[float], samples_b: list[float]) -> float:
    """Median of per-round ratios a/b (rounds are adjacent in time, so load changes largely cancel)."""
    return statistics.median(a / b for a, b in zip(samples_a, samples_b))


def interleaved_ratios(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                       device: torch.device | None = None, baseline: str | None = None) -> dict[str, dict]:
    """Time each function ``reps`` times, alternating between them round by round (the order rotates
    every round).  Per function: median wall seconds (``median_s``), median process CPU seconds
    (``median_cpu_s``: all threads of this process; robust on a shared, oversubscribed CPU where
    wall time mostly measures waiting), and the medians of the per-round ratios to ``baseline``
    (``ratio`` on wall time, ``cpu_ratio`` on CPU time)."""
    device = device or torch.device("cpu")
    names = list(fns)
    baseline = baseline or names[0]
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for n in names:
        out[n] = {"median_s": statistics.median(wall[n]), "min_s": min(wall[n]),
                  "median_cpu_s": statistics.median(cpu[n]), "samples": reps,
                  "ratio": paired_ratio(wall[n], wall[baseline]),
                  "cpu_ratio": paired_ratio(cpu[n], cpu[baseline])}
    return out


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (CPU stand-in for
    ``torch.cuda.max_memory_allocated``).  Every op output whose storage is new is counted until
    the storage is freed; op-internal scratch buffers are not seen."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorMemory() as tracker:
        fn()
    return tracker.peak


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def machine_info(device: torch.device) -> dict:
    import os

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


class single_process_group:
    """A gloo (CPU) / nccl (CUDA) process group of world size 1 for the duration of a ``with``,
    unless one already exists.  Uses an in-memory HashStore: no ports, no files."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.created = False

    def __enter__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.created = True
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()
        self.created = False
