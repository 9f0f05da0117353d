"""``dyrep-ray`` command line: train | tune | convert | eval | report.

User errors (bad config, missing data, unknown model, impossible resources,
unreachable cluster) print one line and exit with code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("dyrep_ray.cli")

EXIT_USAGE = 2
DEFAULT_OUTPUT = "runs"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``argv`` (default ``sys.argv[1:]``) picks the one command module to import fully."""
    parser = argparse.ArgumentParser(prog="dyrep-ray", description="DyRep dynamic re-parameterization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model with DyRep (Ray Train, or --local)")
    t.add_argument("-c", "--config", help="experiment YAML (ours or an original DyRep strategy file); "
                                          "default: the built-in synthetic demo")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    t.add_argument("--workers", type=int, help="number of Ray Train workers (config key 'workers')")
    dev = t.add_mutually_exclusive_group()
    dev.add_argument("--gpu", dest="use_gpu", action="store_const", const=True, help="one GPU per worker")
    dev.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="CPU workers only")
    t.add_argument("--local", action="store_true", help="run in this process without Ray (one device; pdb works)")
    t.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output directory (default: {DEFAULT_OUTPUT})")
    t.add_argument("--name", help="run name (default: <model>-<dataset>-<timestamp>); reuse it to resume")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local instance)")
    shown = t.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true",
                       help="show every log line (Ray's and every worker's) on the console")
    shown.add_argument("--quiet", action="store_true",
                       help="no per-epoch lines and no progress bar: header, warnings, errors and the summary")
    _add_common(t)
    t.set_defaults(func=cmd_train)
    _register_commands(sub, _requested_command(argv))
    return parser


# Other subcommands live next to the code they drive; each module exposes ``register(subparsers, add_common)``
# adding its parsers with ``set_defaults(func=handler)`` where ``handler(args) -> int``.  Only the module of the
# command being run is imported (some import torch); the others appear in ``--help`` from this table, which a
# test keeps equal to what the modules register.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "prepare": ("dyrep_ray.data.commands",
                "export a dataset (synthetic, CIFAR, ImageFolder) to Parquet shards for Ray Data"),
    "convert": ("dyrep_ray.export.commands",
                "fold a DyRep checkpoint into the plain model (safetensors), proving nothing changed"),
    "eval": ("dyrep_ray.export.commands",
             "top-1/top-5/loss of deployed weights or a checkpoint on the validation set"),
    "report": ("dyrep_ray.report.commands",
               "PNG figures + summary.md of what DyRep did to a run (or every trial of a sweep)"),
    "compare": ("dyrep_ray.report.commands",
                "the paper-style table of several runs (plain / DBB / DyRep): Markdown, CSV, top-1 curves"),
    "tune": ("dyrep_ray.tune.commands", "sweep DyRep hyper-parameters with Ray Tune (ASHA, structure-carrying PBT)"),
}


def _requested_command(argv: list[str] | None) -> str | None:
    """The subcommand named on the command line (the top-level parser has no options taking a value)."""
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def _register_commands(sub, requested: str | None) -> None:
    import importlib

    module_name = COMMAND_MODULES.get(requested, (None, ""))[0] if requested else None
    if module_name is not None:
        # Every command module ships with the package: a failing import is a bug to see, not a command to hide.
        importlib.import_module(module_name).register(sub, _add_common)
    for name, (owner, help_text) in COMMAND_MODULES.items():
        if owner != module_name:  # listed in --help; never parsed (its module is imported when it is run)
            sub.add_parser(name, help=help_text, add_help=False)


def _resolve_train_config(args):
    from .engine.config import load_config
    from .package_data import shipped_experiment

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.use_gpu is not None:
        overrides.append(f"use_gpu={str(args.use_gpu).lower()}")
    config = args.config
    if config is not None and not os.path.exists(config):  # ``-c experiments/...`` outside a checkout
        config = shipped_experiment(config) or config
    return load_config(config, overrides)


def cmd_train(args) -> int:
    from .rundir.storage import RunStorage
    from .tracking import resolve_tracking_uri

    cfg = _resolve_train_config(args)
    # A relative MLflow store means "here": resolved before any worker (in another directory) sees it, and
    # before the run directory exists (an address this tool refuses leaves nothing behind).
    cfg = cfg.replace(mlflow_tracking_uri=resolve_tracking_uri(cfg.mlflow_tracking_uri))
    if not args.local:
        from .distributed.trainer import preflight

        preflight(cfg)
    if cfg.data_dir and Path(cfg.data_dir).exists():  # Ray workers run in other directories
        cfg = cfg.replace(data_dir=str(Path(cfg.data_dir).resolve()))
    name = args.name or f"{cfg.model.replace('/', '_')}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    from .rundir.lock import open_run_dir, validate_run_name

    validate_run_name(name)
    if cfg.dataset == "parquet":
        from .data.parquet import resolve_parquet_splits

        cfg = cfg.replace(**resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val))
    lock = open_run_dir(RunStorage(cfg.storage_path or args.output, name), name)  # the driver holds it for the run
    try:
        return _train_locked(args, cfg, name)
    finally:
        lock.release()


def _data_description(cfg) -> str:
    if cfg.dataset == "synthetic":
        return f"synthetic ({cfg.synthetic_train_size} train / {cfg.synthetic_val_size} val images)"
    return f"{cfg.dataset} ({cfg.data_dir or cfg.parquet_train})"


def _train_locked(args, cfg, name: str) -> int:
    from .console import add_run_log, remove_run_log
    from .engine.progress import console
    from .rundir.storage import RunStorage
    from .tracking import build_tracking_callbacks

    storage = RunStorage(cfg.storage_path or args.output, name)
    run_log = add_run_log(storage.root)
    try:
        if args.local:
            import torch

            from .engine.context import LocalContext
            from .engine.loop import train
            from .engine.progress import EpochLines, ProgressBar

            use_cuda = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
            if use_cuda and not torch.cuda.is_available():
                from .distributed.trainer import ClusterError

                raise ClusterError("--gpu requested but no CUDA device is visible; drop --gpu or use --cpu")
            device = torch.device("cuda" if use_cuda else "cpu")
            console.info("train %s: model %s, data %s, local (%s), run dir %s", name, cfg.model,
                         _data_description(cfg), device.type, storage.root)
            callbacks = [ProgressBar(False if args.quiet else None), EpochLines(), *build_tracking_callbacks(cfg)]
            context = LocalContext(device, storage, cfg.keep_checkpoints)
            summary = train(cfg, context, callbacks=callbacks)
            context.check_resumable()
        else:
            from .engine.context import require_a_checkpoint

            summary = _train_on_ray(args, cfg, name, storage)
            require_a_checkpoint(storage, cfg.checkpoint_every)
        from .engine.summary import summary_line

        console.info("%s: %s (run dir: %s)", name, summary_line(summary), storage.root)
    finally:
        remove_run_log(run_log)
    return 0


def _train_on_ray(args, cfg, name: str, storage) -> dict:
    import os

    from .distributed.console import (
        QUIET_RAY_TRAIN_LOG_LEVEL,
        RAY_TRAIN_LOG_LEVEL_ENV,
        EpochFollower,
        WorkerConsole,
        filter_forwarded_output,
        quiet_ray_driver,
    )
    from .distributed.trainer import connect, resolve_use_gpu, run_distributed
    from .engine.progress import console

    if not args.verbose:
        os.environ.setdefault(RAY_TRAIN_LOG_LEVEL_ENV, QUIET_RAY_TRAIN_LOG_LEVEL)  # the Train controller's lines
        quiet_ray_driver()
    connect(args.address)
    if not args.verbose:
        filter_forwarded_output()
    device = "GPU" if resolve_use_gpu(cfg) else "CPU"
    workers = f"{cfg.min_workers}-{cfg.max_workers}" if cfg.elastic else str(cfg.workers)
    console.info("train %s: model %s, data %s, %s %s worker(s) on Ray, run dir %s", name, cfg.model,
                 _data_description(cfg), workers, device, storage.root)
    with EpochFollower(storage, cfg.epochs):
        return run_distributed(cfg, args.output, name, address=args.address,
                               callbacks=[WorkerConsole(verbose=args.verbose)])


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from .console import LOG_FORMAT, setup_console

    if args.command in ("train", "tune"):
        setup_console(verbose=args.verbose, quiet=args.quiet)
    else:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return args.func(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dyrep-ray: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # Only a run that imported the training loop can raise its NonFiniteLossError (checked without importing
        # it: --help, report and compare never load torch).
        loop = sys.modules.get("dyrep_ray.engine.loop")
        if loop is None or not isinstance(exc, loop.NonFiniteLossError):
            raise
        print(f"dyrep-ray: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dyrep-ray: interrupted; re-run the same command (same --output/--name) to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
