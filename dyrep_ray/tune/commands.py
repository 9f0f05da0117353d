"""``dyrep-ray tune``: the command-line front of :mod:`dyrep_ray.tune`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "runs"
#: Kept equal to dyrep_ray.tune.console.DEFAULT_STATUS_INTERVAL_S (a test checks); that module imports Ray.
DEFAULT_STATUS_INTERVAL_S = 120.0


def register(subparsers, add_common) -> None:
    p = subparsers.add_parser(
        "tune", help="sweep DyRep hyper-parameters with Ray Tune (ASHA, structure-carrying PBT)",
        description="Each trial is a distributed DyRep training run (one TorchTrainer) in <output>/<name>/<trial>/. "
                    "At the end the table of trials is printed and saved (trials.csv, trials.parquet) with "
                    "best_config.yaml and a metric-vs-epoch plot.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="sweep YAML, e.g. experiments/tune/demo.yaml (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an experiment config key (e.g. epochs=3) or a sweep key (num_samples=4, "
                        "scheduler.grace_period=2, resources.workers=2); repeatable")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output directory (default: {DEFAULT_OUTPUT})")
    p.add_argument("--name", help="sweep name (default: the sweep file's 'name', else its file name)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in <output>/<name> (errored trials are retried)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("--status-interval", type=float, default=DEFAULT_STATUS_INTERVAL_S, metavar="SECONDS",
                   help="seconds between two status tables of the trials (default: %(default)g; 0: none)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true",
                       help="Ray Tune's own console (config/result tables per trial) and every Ray, trial and "
                            "worker log line")
    shown.add_argument("--quiet", action="store_true",
                       help="no per-result lines: trial starts/ends, status tables, warnings and the final table")
    add_common(p)
    p.set_defaults(func=cmd_tune)


def resolve_sweep_tracking_uri(spec) -> None:
    """A relative MLflow file store means "here" (the tune command's directory): made absolute in the sweep's
    base config before any trial, which runs in another directory, sees it."""
    if spec.base_config.get("mlflow_tracking_uri"):
        from ..tracking import resolve_tracking_uri

        spec.base_config["mlflow_tracking_uri"] = resolve_tracking_uri(spec.base_config["mlflow_tracking_uri"])


def cmd_tune(args) -> int:
    from ..engine.config import ConfigError
    from .results import format_table
    from .spec import load_sweep
    from .sweep import run_sweep

    spec = load_sweep(args.config, args.overrides) if args.config else None
    if spec is None and not args.resume:
        raise ConfigError("dyrep-ray tune needs a sweep file: -c experiments/tune/demo.yaml")
    if spec is None and args.overrides:
        raise ConfigError("--set needs the sweep file (-c); a resumed sweep runs as it was started")
    name = args.name or (spec.name if spec is not None else None) or (Path(args.config).stem if args.config else None)
    if not name:
        raise ConfigError("--resume without -c needs --name (the sweep directory under --output)")
    if args.status_interval < 0:
        raise ConfigError(f"--status-interval must be >= 0 seconds, got {args.status_interval:g}")
    if spec is not None:
        resolve_sweep_tracking_uri(spec)
    from ..console import add_run_log, remove_run_log
    from ..rundir.layout import SWEEP_FILE, TUNE_LOG
    from .console import SweepConsole

    console = None if args.verbose else SweepConsole(status_interval_s=args.status_interval)
    run_log = add_run_log(Path(args.output) / name, marker=SWEEP_FILE, log_name=TUNE_LOG)
    try:
        outcome = run_sweep(spec, args.output, name, resume=args.resume, address=args.address,
                            verbose=2 if args.verbose else 0, console=console)
    finally:
        remove_run_log(run_log)
    spec = outcome.spec
    print(f"\ndyrep-ray tune: sweep {name}: {len(outcome.records)} trial(s), metric {spec.metric} ({spec.mode})")
    print(format_table(outcome.table, spec))
    counts = Counter(record.status for record in outcome.records)
    print("trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if outcome.best:
        best = outcome.best
        print(f"best: {best['trial_id']} {spec.metric} {best['value']:.4g} at epoch {best['epoch']} "
              f"({', '.join(f'{k}={v}' for k, v in best['config'].items())})")
    for kind, path in outcome.files.items():
        print(f"{kind}: {path}")
    if outcome.interrupted:
        print(f"dyrep-ray tune: sweep interrupted; continue it with: dyrep-ray tune --resume --output {args.output} "
              f"--name {name}", file=sys.stderr)
        return 130
    return 0 if any(r.status != "error" for r in outcome.records) else 1
