"""``python -m bench``: dyrep-ray performance benchmarks, each ratio measured in one process against
its baseline (runs alternated, medians of per-round ratios).

    python -m bench                 # all benchmarks, a few minutes on CPU (GPU when present)
    python -m bench --quick         # smaller batches/repetitions, no Ray runs (~1-2 minutes idle CPU)
    python -m bench --only dbb_block,schedule --out perf.json
    python -m bench --gpu           # the GPU suite (bench/gpu.py): one GPU, < 10 minutes, JSON to bench/results/
    python -m bench --gpu --dry-run # the same code paths on CPU in seconds (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

from . import adjust, checkpoint_upload, data_path, dbb_block, dyrep_overhead, gpu, online_block, ray_overhead, schedule
from .common import machine_info, pick_device
from .report import ROW_BUILDERS, markdown_table

BENCHMARKS = {
    "dyrep_overhead": lambda dev, a: dyrep_overhead.run(dev, quick=a.quick),
    "dbb_block": lambda dev, a: dbb_block.run(dev, quick=a.quick),
    "schedule": lambda dev, a: schedule.run(dev, quick=a.quick),
    "adjust": lambda dev, a: adjust.run(dev, quick=a.quick),
    "ray_overhead": lambda dev, a: ray_overhead.run(dev, quick=a.quick, shutdown=False),
    "data_path": lambda dev, a: data_path.run(dev, quick=a.quick, use_ray=a.ray),
    "online_block": lambda dev, a: online_block.run(dev, quick=a.quick),
    "checkpoint_upload": lambda dev, a: (checkpoint_upload.run(dev, a.quick, shutdown=False) if a.ray
                                         else checkpoint_upload.skipped()),
}
ROW_BUILDERS = {**ROW_BUILDERS, "online_block": online_block.table_rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes/repetitions; skips the Ray runs")
    p.add_argument("--out", help="write the full results as JSON to this file")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default 1: on a shared CPU, OpenMP barriers of "
                        "several threads stall whenever one is descheduled, which swamps the ratios)")
    p.add_argument("--gpu", action="store_true", help="run the GPU suite (bench/gpu.py) instead of the CPU benchmarks")
    p.add_argument("--dry-run", action="store_true", help="with --gpu: every code path on CPU, tiny shapes")
    ray_group = p.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="include Ray runs (benchmark 6, Ray Data in 7); default: on unless --quick")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false")
    args = p.parse_args(argv)
    if args.ray is None:
        args.ray = not args.quick
    return args


GPU_RESULTS = Path("bench/results/gpu.json")


def run_gpu_suite(args: argparse.Namespace) -> int:
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("--gpu needs a CUDA device and none is visible; add --dry-run to exercise the suite on CPU",
              file=sys.stderr)
        return 2
    else:
        device = pick_device(args.device or "cuda")
    start = time.perf_counter()
    result = gpu.run(device, dry_run=args.dry_run)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(gpu.markdown(result))
    out = Path(args.out) if args.out else GPU_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nfull results: {out} ({result['total_seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.gpu:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_gpu_suite(args)
    if args.dry_run:
        print("--dry-run applies to --gpu only", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    if "ray_overhead" in names and not args.ray:
        names.remove("ray_overhead")
    report = {"machine": machine_info(device), "args": vars(args), "results": {}, "seconds": {}, "errors": {}}
    rows = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            result = BENCHMARKS[name](device, args)
        except Exception as exc:  # keep going: one failing benchmark should not hide the others
            report["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
            rows.append(("-", name, f"ERROR: {report['errors'][name]}", "", False))
            continue
        finally:
            report["seconds"][name] = round(time.perf_counter() - t0, 1)
        report["results"][name] = result
        rows.extend(ROW_BUILDERS[name](result))
        print(f"[bench] {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["table_rows"] = [list(r) for r in rows]
    m = report["machine"]
    print(f"\ndyrep-ray benchmarks on {m['device']} ({m.get('gpu') or m.get('cpu_model')}, {m['cpu_count']} CPUs, "
          f"torch {m['torch']}, {m['torch_threads']} thread(s), load avg {m.get('load_avg_1m', '?')}); "
          f"{'quick' if args.quick else 'full'} run, {report['total_seconds']:.0f} s\n")
    print(markdown_table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        print(f"\nfull results: {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
