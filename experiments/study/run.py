"""Seeds study on the built-in synthetic data: plain vs static DBB vs DyRep (original defaults) vs DyRep with the
refinements (and any other variant listed in VARIANTS), same budget for each, every run a ``--local`` run.

    python experiments/study/run.py                      # 3 seeds, the default budget (see DEFAULT_BUDGET)
    python experiments/study/run.py --seeds 5 --epochs 12 --out runs/study12
    python experiments/study/run.py --quick              # smoke test: tiny sizes, 1 seed

Writes ``<out>/study.md`` (the table: mean ± sample std over seeds of best val top-1 and training time),
``<out>/study_runs.csv`` (one row per run, compare's columns) and one run directory per (variant, seed) under
``<out>/runs/`` (``dyrep-ray compare`` / ``dyrep-ray report`` read them). A variant whose config keys do not
exist in this version of dyrep-ray is skipped with a logged notice (it appears in the table as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("study")


@dataclass(frozen=True)
class Variant:
    name: str
    keys: dict[str, Any] = field(default_factory=dict)  # config keys that make this variant
    note: str = ""


# The rows of the study, as data: add a variant by adding a line.
VARIANTS: tuple[Variant, ...] = (
    Variant("plain", {"dyrep": False}, "no re-parameterization"),
    Variant("DBB", {"dyrep": False, "dbb": True}, "every eligible conv a block from the start (static DBB)"),
    Variant("DyRep (original)", {"dyrep": True}, "the original's defaults"),
    Variant("DyRep + refinements", {"dyrep": True, "dyrep_cut_lone_branch": True, "dyrep_cut_mode": "absorb"},
            "lone branches may be cut (collapse), cut branches absorbed into kxk"),
    Variant("DyRep online block", {"dyrep": True, "dyrep_block": "online"}, "dyrep_block: online"),
)

# Same budget for every variant. Sized for 5 variants x 3 seeds in <= 25 minutes on an idle 2-core CPU: a DyRep
# run of 2048 images took 64 CPU-seconds per epoch (measured on a heavily shared machine, so from CPU time, not
# wall time); half the images and 2 threads give ~1.5 minutes per 6-epoch run.
DEFAULT_SEEDS = 3
DEFAULT_BUDGET: dict[str, Any] = {
    "model": "small_cnn", "dataset": "synthetic", "epochs": 6, "synthetic_train_size": 1024,
    "synthetic_val_size": 256, "batch_size": 64, "dyrep_adjust_interval": 1,
}
QUICK_BUDGET: dict[str, Any] = {
    **DEFAULT_BUDGET, "epochs": 2, "synthetic_train_size": 64, "synthetic_val_size": 32, "batch_size": 16,
    "dyrep_recal_bn_iters": 1,
}
FIRST_SEED = 0
DEFAULT_OUT = Path("runs/study")
STUDY_MD = "study.md"
STUDY_CSV = "study_runs.csv"
RUNS_DIR = "runs"


def config_fields() -> set[str]:
    from dyrep_ray.engine.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def missing_keys(variant: Variant, known: set[str]) -> list[str]:
    return sorted(k for k in variant.keys if k not in known)


def run_dir_name(variant: Variant, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in variant.name.lower()).strip("_")
    return f"{slug}_seed{seed}"


def run_one(variant: Variant, seed: int, budget: dict[str, Any], run_dir: Path) -> Path:
    """Train one (variant, seed) in this process, without Ray; returns its run directory."""
    import torch

    from dyrep_ray.engine.config import TrainConfig
    from dyrep_ray.engine.context import LocalContext
    from dyrep_ray.engine.loop import train

    cfg = TrainConfig.from_dict({**budget, **variant.keys, "seed": seed, "use_gpu": False})
    train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))
    return run_dir


def mean_std(values: list[float], spec: str) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{spec}} (1 seed)"
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def study_table(results: dict[str, list], skipped: dict[str, list[str]]) -> str:
    """Markdown: one line per variant, mean ± sample std over seeds (compare's table code)."""
    from dyrep_ray.report.compare import fmt, markdown_table

    header = ["variant", "config keys", "seeds", "best top-1 (%)", "final top-1 (%)", "train time (s)",
              "train params (end)"]
    rows = []
    for variant in VARIANTS:
        keys = ", ".join(f"{k}={v}" for k, v in variant.keys.items())
        if variant.name in skipped:
            rows.append([variant.name, keys, "skipped", f"needs config key(s) {', '.join(skipped[variant.name])}",
                         "", "", ""])
            continue
        got = results.get(variant.name, [])
        params = sorted({r.train_params for r in got if r.train_params is not None})
        rows.append([variant.name, keys, str(len(got)),
                     mean_std([r.best_top1 for r in got if r.best_top1 is not None], ".2f"),
                     mean_std([r.final_top1 for r in got if r.final_top1 is not None], ".2f"),
                     mean_std([r.train_time_s for r in got if r.train_time_s is not None], ".1f"),
                     " / ".join(fmt(p, ",") for p in params) or "n/a"])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per variant (default {DEFAULT_SEEDS})")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {DEFAULT_BUDGET['epochs']})")
    parser.add_argument("--train-size", type=int,
                        help=f"synthetic training images (default {DEFAULT_BUDGET['synthetic_train_size']})")
    parser.add_argument("--only", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dyrep_ray").setLevel(logging.WARNING)  # one line per run from here, not per epoch

    budget = dict(QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    if args.epochs is not None:
        budget["epochs"] = args.epochs
    if args.train_size is not None:
        budget["synthetic_train_size"] = args.train_size
    seeds = 1 if args.quick else args.seeds
    if seeds < 1:
        print("study: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    names = {v.name for v in VARIANTS}
    only = set(args.only.split(",")) if args.only else names
    if only - names:
        print(f"study: error: unknown variant(s) {sorted(only - names)}; known: {sorted(names)}", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"study: error: {args.out} is not empty; pass another --out or delete it", file=sys.stderr)
        return 2

    from dyrep_ray.report.compare import compare_csv, compare_row, read_run

    known = config_fields()
    skipped: dict[str, list[str]] = {}
    results: dict[str, list] = {}
    all_rows = []
    started = time.perf_counter()
    for variant in (v for v in VARIANTS if v.name in only):
        missing = missing_keys(variant, known)
        if missing:
            skipped[variant.name] = missing
            logger.warning("skipping variant %r: this dyrep-ray has no config key(s) %s", variant.name,
                           ", ".join(missing))
            continue
        for seed in range(FIRST_SEED, FIRST_SEED + seeds):
            run_dir = run_one(variant, seed, budget, args.out / RUNS_DIR / run_dir_name(variant, seed))
            row = dataclasses.replace(compare_row(read_run(run_dir)), run=f"{variant.name} / seed {seed}")
            results.setdefault(variant.name, []).append(row)
            all_rows.append(row)
            logger.info("%s seed %d: best top-1 %.2f%%, %.1f s", variant.name, seed, row.best_top1 or float("nan"),
                        row.train_time_s or float("nan"))
    total = time.perf_counter() - started
    table = study_table(results, skipped)
    budget_text = ", ".join(f"{k}={v}" for k, v in budget.items())
    text = (f"# dyrep-ray seeds study\n\nSame budget for every variant ({budget_text}); seeds "
            f"{FIRST_SEED}..{FIRST_SEED + seeds - 1}; every run `--local` on CPU; mean ± sample std over seeds. "
            f"Total wall time {total:.0f} s.\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / STUDY_MD).write_text(text)
    (args.out / STUDY_CSV).write_text(compare_csv(all_rows))
    print(text)
    print(f"study: wrote {args.out / STUDY_MD} and {args.out / STUDY_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
