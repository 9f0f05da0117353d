"""``dyrep-ray convert`` and ``dyrep-ray eval``.

Exit codes: 0 success; 1 the folded model is not equivalent (nothing written); 2 user errors,
including a checkpoint that is unsafe to load (handled by :func:`dyrep_ray.cli.main`).
"""

from __future__ import annotations

import json
import logging
import sys

from ..errors import UserError

EXIT_NOT_EQUIVALENT = 1
logger = logging.getLogger(__name__)


def _check_batch_size(value: int | None) -> None:
    from ..engine.config import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {value}")


class ExportFileError(UserError):
    """Reading the inputs or writing the outputs of convert/eval failed (path, permissions, disk)."""


def _io_error(exc: OSError) -> ExportFileError:
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    return ExportFileError(f"cannot read or write{where} ({exc.strerror or exc}); check the path (--out must be "
                           "a writable file path, not a directory) and the disk")


def register(subparsers, add_common) -> None:
    c = subparsers.add_parser(
        "convert", help="fold a DyRep checkpoint into the plain model (safetensors), proving nothing changed",
        description="Rebuild the trained model from a checkpoint, fold every Diverse Branch Block into one conv, "
                    "verify the folded model loads strict=True into the untouched architecture with the same "
                    "params/MACs and gives the same outputs and top-1, then write safetensors + a JSON summary. "
                    "Exit code 1 if the check fails (nothing is written).")
    c.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directory (newest valid checkpoint is used) or checkpoint directory")
    c.add_argument("--out", help="weights file (default: <run_dir>/deployed.safetensors; JSON written beside it)")
    c.add_argument("--data-dir", help="override the config's data_dir for the validation set "
                                      "(dataset parquet: the validation shards)")
    c.add_argument("--no-eval", action="store_true",
                   help="skip the validation set; compare outputs on random inputs only")
    c.add_argument("--torchscript", metavar="FILE", help="also write torch.jit.trace of the deployed model")
    c.add_argument("--onnx", metavar="FILE", help="also write ONNX (skipped if the 'onnx' package is missing)")
    c.add_argument("--mlflow-tracking-uri", metavar="URI",
                   help="also log the deployed files to the run's MLflow run (its id from <run_dir>/tracking.json) "
                        "at this tracking URI; without it convert contacts no tracking store, whatever the run "
                        "directory names")
    c.add_argument("--ema", action="store_true", help="convert the EMA weights instead of the model's")
    c.add_argument("--device", default="cpu", help="device for the verification (default: cpu; 'auto', 'cuda')")
    c.add_argument("--batch-size", type=int, help="validation batch size (default: the config's)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(c)
    c.set_defaults(func=cmd_convert)

    e = subparsers.add_parser(
        "eval", help="top-1/top-5/loss of deployed weights or a checkpoint on the validation set",
        description="WEIGHTS_OR_CHECKPOINT: a deployed .safetensors (its JSON sidecar names model and config), "
                    "a checkpoint or run directory, or a plain .pt/.pth state dict (needs -c).")
    e.add_argument("weights", metavar="WEIGHTS_OR_CHECKPOINT")
    e.add_argument("-c", "--config", help="experiment YAML (optional when the weights carry their config)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    e.add_argument("--data-dir", help="override the config's data_dir (dataset parquet: the validation shards)")
    e.add_argument("--ema", action="store_true", help="checkpoints: evaluate the EMA weights")
    e.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    e.add_argument("--batch-size", type=int, help="validation batch size (default: the config's)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(e)
    e.set_defaults(func=cmd_eval)


def cmd_convert(args) -> int:
    from .convert import ConversionCheckError, convert_checkpoint
    from .evaluate import check_checkpoint_model_size
    from .weights import resolve_checkpoint

    _check_batch_size(args.batch_size)
    check_checkpoint_model_size(resolve_checkpoint(args.source))  # a huge model named in meta: refused, not built
    try:
        result = convert_checkpoint(
            args.source, args.out, data_dir=args.data_dir, evaluate=not args.no_eval, torchscript=args.torchscript,
            onnx=args.onnx, use_ema=args.ema, device=args.device, batch_size=args.batch_size,
            progress=not args.no_progress)
    except ConversionCheckError as exc:
        if args.debug:
            raise
        print(f"dyrep-ray: convert FAILED: {exc}", file=sys.stderr)
        return EXIT_NOT_EQUIVALENT
    except OSError as exc:
        if args.debug:
            raise
        raise _io_error(exc) from exc
    for line in result.summary_lines():
        print(f"dyrep-ray: convert: {line}")
    _log_deployed_to_tracking(args.source, result, args.mlflow_tracking_uri)
    return 0


def _log_deployed_to_tracking(source, result, tracking_uri: str | None) -> None:
    """Attach the written weights to the run's MLflow run at ``tracking_uri`` (a failure is one warning line).

    A run directory may come from someone else: the address in its ``tracking.json`` is never contacted (nor a
    file store created there) unless the user names the store with ``--mlflow-tracking-uri``."""
    from .weights import resolve_checkpoint

    run_dir = resolve_checkpoint(source).parent
    if tracking_uri is None:
        from ..rundir.layout import TRACKING_FILE

        if (run_dir / TRACKING_FILE).is_file():
            logger.info("MLflow: deployed weights not logged (the run directory's %s names a tracking store; "
                        "pass --mlflow-tracking-uri URI to log them there)", TRACKING_FILE)
        return
    from ..tracking import resolve_tracking_uri
    from ..tracking.mlflow import log_deployed_artifacts

    log_deployed_artifacts(run_dir, result.weights, result.sidecar, tracking_uri=resolve_tracking_uri(tracking_uri))


def cmd_eval(args) -> int:
    from .evaluate import evaluate_weights

    _check_batch_size(args.batch_size)
    try:
        result = evaluate_weights(args.weights, args.config, args.overrides, data_dir=args.data_dir,
                                  device=args.device, batch_size=args.batch_size, use_ema=args.ema,
                                  progress=not args.no_progress)
    except OSError as exc:
        if args.debug:
            raise
        raise _io_error(exc) from exc
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"dyrep-ray: eval: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"on {result['images']} {result['dataset']} validation images ({result['model']}, {result['source']})")
    return 0
