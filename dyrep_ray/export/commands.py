"""``dyrep-ray convert`` and ``dyrep-ray eval``.

Exit codes: 0 success; 1 the folded model is not equivalent (nothing written); 2 user errors,
including a checkpoint that is unsafe to load (handled by :func:`dyrep_ray.cli.main`).
"""

from __future__ import annotations

import json
import sys

from ..errors import UserError

EXIT_NOT_EQUIVALENT = 1


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
    _log_deployed_to_tracking(args.source, result)
    return 0


def _log_deployed_to_tracking(source, result) -> None:
    """Attach the written weights to the run's MLflow run, if it has one (a failure is one warning line)."""
    from ..tracking.mlflow import log_deployed_artifacts
    from .weights import resolve_checkpoint

    log_deployed_artifacts(resolve_checkpoint(source).parent, result.weights, result.sidecar)


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
