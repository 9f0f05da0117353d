"""The default demo (``--local``, CPU) with online blocks vs the same run with DyRep off, in one process.

    python -m bench.demo_overhead [--rounds 3] [--threads 1] [--set KEY=VALUE ...]

An untimed warm-up run first (one-time costs of the first run in a process), then the two variants alternated
round by round (order reversed every round); per round the online/off ratio of wall and of process CPU time,
medians reported.  Goal: online <= 1.2x the DyRep-off wall time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train

VARIANTS = {"off": ["dyrep=false"], "online": ["dyrep_block=online"]}
GOAL = 1.2


def _timed(overrides: list[str]) -> tuple[float, float, dict]:
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))
        return time.perf_counter() - t0, time.process_time() - c0, summary


def run(rounds: int, extra: Sequence[str] = ()) -> dict:
    _timed([*VARIANTS["off"], *extra])  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in VARIANTS}
    cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
    grows = 0
    for r in range(rounds):
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            w, c, summary = _timed([*VARIANTS[name], *extra])
            wall[name].append(w)
            cpu[name].append(c)
            grows = summary.get("grows", 0) if name == "online" else grows
    wall_ratios = [a / b for a, b in zip(wall["online"], wall["off"])]
    cpu_ratios = [a / b for a, b in zip(cpu["online"], cpu["off"])]
    return {"wall_s": wall, "cpu_s": cpu, "grows": grows, "wall_ratio": statistics.median(wall_ratios),
            "cpu_ratio": statistics.median(cpu_ratios), "wall_ratios": wall_ratios, "cpu_ratios": cpu_ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to both variants")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    r = run(args.rounds, args.overrides)
    print(f"demo online / DyRep off ({r['grows']} grows): wall {r['wall_ratio']:.3f}x, CPU {r['cpu_ratio']:.3f}x "
          f"(median of {args.rounds}; per round wall {[round(x, 3) for x in r['wall_ratios']]}); "
          f"goal <= {GOAL}x: {'met' if r['wall_ratio'] <= GOAL else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
