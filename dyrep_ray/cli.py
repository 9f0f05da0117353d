"""``dyrep-ray`` command line: train | tune | convert | eval | report.

User errors (bad config, missing data, unknown model, impossible resources,
unreachable cluster) print one line and exit with code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("dyrep_ray.cli")

EXIT_USAGE = 2
DEFAULT_OUTPUT = "runs"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
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
    _add_common(t)
    t.set_defaults(func=cmd_train)
    for module_name in COMMAND_MODULES:
        _register_commands(module_name, sub)
    return parser


# Other subcommands live next to the code they drive; each module exposes
# ``register(subparsers)`` adding its parser with ``set_defaults(func=handler)``
# where ``handler(args) -> int``.
COMMAND_MODULES = (
    "dyrep_ray.data.commands",      # prepare
    "dyrep_ray.export.commands",    # convert, eval
    "dyrep_ray.report.commands",    # report
    "dyrep_ray.tune.commands",      # tune
)


def _register_commands(module_name: str, sub) -> None:
    import importlib

    # Every command module ships with the package: a failing import is a bug to see, not a command to hide.
    importlib.import_module(module_name).register(sub, _add_common)


def _resolve_train_config(args):
    from .engine.config import load_config

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.use_gpu is not None:
        overrides.append(f"use_gpu={str(args.use_gpu).lower()}")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from .engine.storage import RunStorage

    cfg = _resolve_train_config(args)
    if not args.local:
        from .distributed.trainer import preflight

        preflight(cfg)
    if cfg.data_dir and Path(cfg.data_dir).exists():  # Ray workers run in other directories
        cfg = cfg.replace(data_dir=str(Path(cfg.data_dir).resolve()))
    name = args.name or f"{cfg.model.replace('/', '_')}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    from .engine.rundir import open_run_dir, validate_run_name

    validate_run_name(name)
    if cfg.dataset == "parquet":
        from .data.parquet import resolve_parquet_splits

        cfg = cfg.replace(**resolve_parquet_splits(cfg.parquet_train, cfg.parquet_val))
    lock = open_run_dir(RunStorage(cfg.storage_path or args.output, name), name)  # the driver holds it for the run
    try:
        return _train_locked(args, cfg, name)
    finally:
        lock.release()


def _train_locked(args, cfg, name: str) -> int:
    import torch

    from .engine.loop import summary_line
    from .engine.storage import RunStorage

    if args.local:
        from .engine.context import LocalContext
        from .engine.loop import train

        use_cuda = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
        if use_cuda and not torch.cuda.is_available():
            from .distributed.trainer import ClusterError

            raise ClusterError("--gpu requested but no CUDA device is visible; drop --gpu or use --cpu")
        storage = RunStorage(cfg.storage_path or args.output, name)
        summary = train(cfg, LocalContext(torch.device("cuda" if use_cuda else "cpu"), storage,
                                          cfg.keep_checkpoints))
    else:
        from .distributed.trainer import run_distributed

        storage = RunStorage(cfg.storage_path or args.output, name)
        summary = run_distributed(cfg, args.output, name, address=args.address)
    run_dir = storage.root
    print(f"dyrep-ray: {name}: {summary_line(summary)} (run dir: {run_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .engine.loop import NonFiniteLossError as NonFiniteError
    from .errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return args.func(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dyrep-ray: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as exc:
        print(f"dyrep-ray: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dyrep-ray: interrupted; re-run the same command (same --output/--name) to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
