"""Benchmark 8: online (OREPA-style) blocks vs DiverseBranchBlocks vs the plain model.

* Grown models: ResNet-18 (torchvision) and VGG-16 (CIFAR) at 32x32, the SAME convs grown in both block
  types (``GROWN_CONVS`` 3x3 convs spread evenly over the network's depth, chosen deterministically, the
  7x7 stem excluded).  Per training step (fwd + bwd + SGD step) time, alternated with the plain model in one
  run (median of per-round ratios); peak live tensor memory of one fwd + bwd with the gradient buffers
  already allocated (activations + temporaries: ``torch.cuda.max_memory_allocated`` on a GPU, a dispatch-mode
  tracker of live storages on the CPU) and bytes autograd saves for backward, parameters excluded
  (``saved_tensors_hooks``).
* One block vs one plain conv (fwd + bwd; the bn block's fused forward, online block, plain conv).

    python -m bench.online_block [--quick] [--batch 32] [--grown all]   # or: python -m bench --only online_block
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.models import build_model
from dyrep_ray.rep.blocks import is_block
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.online import grow_online_block
from dyrep_ray.rep.paths import eligible_convs, get_submodule, set_submodule

from .common import interleaved_ratios, machine_info, peak_memory, pick_device

MODELS = ("resnet18", "vgg16_cifar")
NUM_CLASSES = 10
IMAGE_SIZE = 32
GROWN_CONVS = 4
ALL_CONVS = 10**6  # ``count`` meaning every eligible 3x3 conv
STEM = "conv1"  # ResNet's 7x7 stem: not a 3x3 conv
BLOCK_SHAPES = (("64x32x32", 64, 32), ("256x14x14", 256, 14))
GOAL_TIME = 1.15  # online grown model step time / plain
GOAL_MEM = 1.10  # online grown model peak memory / plain
VARIANTS = ("plain", "online", "bn")


def grown_paths(model: nn.Module, count: int = GROWN_CONVS) -> list[str]:
    """``count`` 3x3 convs evenly spaced over the model's eligible convs (first and last included)."""
    paths = [p for p, conv in eligible_convs(model, max_depth=1, exclude=(STEM,)) if conv.kernel_size == (3, 3)]
    if len(paths) <= count:
        return paths
    return [paths[round(i * (len(paths) - 1) / (count - 1))] for i in range(count)]


def build_variants(model_name: str, device: torch.device, count: int = GROWN_CONVS) -> tuple[dict, list[str]]:
    """plain model, the same with ``grown_paths`` as online blocks, and as bn blocks (``grow_conv``)."""
    torch.manual_seed(0)
    plain = build_model(model_name, NUM_CLASSES).to(device)
    paths = grown_paths(plain, count)
    online, bn = copy.deepcopy(plain), copy.deepcopy(plain)
    for i, path in enumerate(paths):
        set_submodule(online, path, grow_online_block(get_submodule(online, path), seed=i))
        grow_conv(bn, path, seed=i)
    return {"plain": plain, "online": online, "bn": bn}, paths


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _train_step(model: nn.Module, images, targets):
    optimizer = _optimizer(model)
    model.train()

    def step():
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def saved_activation_bytes(model: nn.Module, fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs, parameters excluded (those
    exist anyway): the activation memory proper (``saved_tensors_hooks``)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _fwd_bwd_peak(model: nn.Module, loss_fn, device) -> int:
    """Peak bytes of one fwd + bwd above the already-allocated gradient buffers (zeroed in place)."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()

    def step():
        model.zero_grad(set_to_none=False)
        loss_fn().backward()

    peak = peak_memory(step, device)
    model.zero_grad(set_to_none=True)
    return peak


def measure_models(device, batch: int, reps: int, models=MODELS, count: int = GROWN_CONVS) -> dict:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name in models:
        variants, paths = build_variants(name, device, count)
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
        targets = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        steps = {v: _train_step(m, images, targets) for v, m in variants.items()}
        timing = interleaved_ratios(steps, reps=reps, warmup=1, device=device, baseline="plain")
        peak, saved = {}, {}
        for v, m in variants.items():
            m.train()
            peak[v] = _fwd_bwd_peak(m, lambda m=m: F.cross_entropy(m(images), targets), device)
            saved[v] = saved_activation_bytes(m, lambda m=m: m(images))
        blocks = {v: sum(is_block(x) for x in m.modules())
                  for v, m in variants.items()}
        out[name] = {
            "grown": paths, "blocks": blocks, "batch": batch, "reps": reps,
            "step_s": {v: timing[v]["median_s"] for v in VARIANTS},
            "time_over_plain": {v: timing[v]["ratio"] for v in VARIANTS},
            "cpu_time_over_plain": {v: timing[v]["cpu_ratio"] for v in VARIANTS},
            "peak_bytes": peak, "saved_bytes": saved,
            "peak_over_plain": {v: peak[v] / peak["plain"] for v in VARIANTS},
            "saved_over_plain": {v: saved[v] / saved["plain"] for v in VARIANTS},
        }
    return out


def measure_block(device, batch: int, reps: int, shapes=BLOCK_SHAPES) -> dict:
    """One 3x3 conv (64/256 channels, stride 1: all 7 branches) as plain conv / online block / bn block."""
    out = {}
    for name, channels, side in shapes:
        torch.manual_seed(0)
        conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False, device=device)
        variants = {"plain": conv, "online": grow_online_block(copy.deepcopy(conv), seed=0)}
        holder = nn.Sequential(copy.deepcopy(conv))
        variants["bn"] = grow_conv(holder, "0", seed=0)
        x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
        grad = torch.randn(batch, channels, side, side, device=device)

        def fwd_bwd(m):
            def step():
                m.zero_grad(set_to_none=True)
                x.grad = None
                m(x).backward(grad)
            return step

        for m in variants.values():
            m.train()
        timing = interleaved_ratios({v: fwd_bwd(m) for v, m in variants.items()}, reps=reps, warmup=2,
                                    device=device, baseline="plain")
        peak = {v: _fwd_bwd_peak(m, lambda m=m: (m(x) * grad).sum(), device) for v, m in variants.items()}
        x.grad = None
        out[name] = {"batch": batch, "reps": reps,
                     "time_s": {v: timing[v]["median_s"] for v in VARIANTS},
                     "time_over_plain": {v: timing[v]["ratio"] for v in VARIANTS},
                     "peak_bytes": peak, "peak_over_plain": {v: peak[v] / peak["plain"] for v in VARIANTS}}
    return out


def run(device: torch.device, quick: bool = False, batch: int | None = None, reps: int | None = None,
        models=MODELS, block_shapes=BLOCK_SHAPES, count: int = GROWN_CONVS) -> dict:
    if batch is None:
        batch = 64 if device.type == "cuda" else (8 if quick else 16)
    reps = reps or (3 if quick else 7)
    result = {"models": measure_models(device, batch, reps, models, count),
              "block": measure_block(device, batch, reps, block_shapes),
              "goal_time": GOAL_TIME, "goal_mem": GOAL_MEM}
    m = result["models"].values()
    result["met_time"] = all(e["time_over_plain"]["online"] <= GOAL_TIME for e in m)
    result["met_mem"] = all(e["peak_over_plain"]["online"] <= GOAL_MEM for e in m)
    result["met"] = result["met_time"] and result["met_mem"]
    return result


def _x(v: float) -> str:
    return f"{v:.2f}x"


def table_rows(r: dict) -> list[tuple]:
    rows = []
    for name, e in r["models"].items():
        t, p, s = e["time_over_plain"], e["peak_over_plain"], e["saved_over_plain"]
        rows.append(("8", f"{name} 32x32 b{e['batch']}, {len(e['grown'])} convs grown: step time / plain",
                     f"online {_x(t['online'])}, bn {_x(t['bn'])} (plain {e['step_s']['plain'] * 1e3:.0f} ms; "
                     f"CPU-time online {_x(e['cpu_time_over_plain']['online'])}, "
                     f"bn {_x(e['cpu_time_over_plain']['bn'])})",
                     f"online <= {GOAL_TIME}x", t["online"] <= r["goal_time"]))
        rows.append(("8", f"{name} peak fwd+bwd memory / plain (saved-for-backward / plain)",
                     f"online {_x(p['online'])} ({_x(s['online'])}), bn {_x(p['bn'])} ({_x(s['bn'])}); "
                     f"plain {e['peak_bytes']['plain'] / 2**20:.1f} MiB",
                     f"online <= {GOAL_MEM}x", p["online"] <= r["goal_mem"]))
    for name, e in r["block"].items():
        t, p = e["time_over_plain"], e["peak_over_plain"]
        rows.append(("8", f"one 7-branch block {name} b{e['batch']} fwd+bwd / plain conv",
                     f"time online {_x(t['online'])}, bn {_x(t['bn'])}; peak mem online {_x(p['online'])}, "
                     f"bn {_x(p['bn'])}", "report", None))
    return rows


def main(argv=None) -> int:
    from .report import markdown_table

    p = argparse.ArgumentParser(prog="python -m bench.online_block", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batch and fewer repetitions (smoke mode)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--batch", type=int, help="batch size (default: 8 with --quick, 16 on CPU, 64 on CUDA)")
    p.add_argument("--reps", type=int, help="timed rounds (default: 3 with --quick, else 7)")
    p.add_argument("--grown", default=str(GROWN_CONVS),
                   help=f"convs grown per model: a number (default {GROWN_CONVS}) or 'all' (every eligible 3x3 conv)")
    args = p.parse_args(argv)
    if args.grown != "all" and not args.grown.isdigit():
        p.error(f"--grown takes a number or 'all', not {args.grown!r}")
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    count = ALL_CONVS if args.grown == "all" else int(args.grown)
    r = run(device, quick=args.quick, batch=args.batch, reps=args.reps, count=count)
    m = machine_info(device)
    print(f"online block benchmark on {m['device']} ({m.get('gpu') or m.get('cpu_model')}, {m['cpu_count']} CPUs, "
          f"torch {m['torch']}, {m['torch_threads']} thread(s), load avg {m.get('load_avg_1m', '?')})")
    for name, e in r["models"].items():
        print(f"{name}: grown {e['grown']}")
    print(markdown_table(table_rows(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
