"""Checkpoint -> plain inference model, with proof that folding changed nothing.

:func:`convert_checkpoint` is what ``dyrep-ray convert`` runs:

1. load a checkpoint safely (manifest verified, ``state.pt`` read with ``weights_only=True``;
   a pickled payload is refused with one line and never executed) on the CPU;
2. rebuild the trained model: ``build_model(config.model, num_classes)`` + ``restore_graph`` +
   ``load_state_dict(strict=True)``;
3. fold every Diverse Branch Block (:func:`dyrep_ray.rep.deploy`) and load the result with
   ``strict=True`` into a freshly built, never-grown model of the same architecture; its
   parameter count and MACs must equal the never-grown model's;
4. write that state dict as safetensors, read the file back into another fresh model, and run the
   trained model and the reloaded one on the same validation batches (random inputs with
   ``evaluate=False``);
5. fail (:class:`ConversionCheckError`, exit code 1 in the CLI) unless

   * top-1 differs by at most :data:`TOP1_TOLERANCE` points, and
   * on every batch ``max|trained - deployed| <= RTOL * max|trained| + ATOL``
     (:data:`RTOL` = 1e-4, :data:`ATOL` = 1e-5): folding only reorders float32 sums, whose
     rounding grows with depth to ~1e-6 relative; a wrong fold is off by O(1) relative.

   Only then is the file moved into place and the JSON sidecar written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.checkpoint import sha256_file
from ..engine.config import ConfigError
from ..models import build_model, count_macs, count_params
from ..rep import deploy
from ..rep.blocks import is_block
from ..rundir.layout import DEPLOYED_WEIGHTS as DEFAULT_WEIGHTS_NAME
from ..rundir.layout import MACS_KEY
from ..rundir.lock import check_output_file, refuse_symlinks
from .evaluate import compare_models, exact_float32, resolve_device, validation_loader
from .weights import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    load_checkpoint_safely,
    load_safetensors_state,
    rebuild_trained_model,
    resolve_checkpoint,
    sidecar_path,
    strict_load,
)

logger = logging.getLogger(__name__)

RTOL = 1e-4
ATOL = 1e-5
TOP1_TOLERANCE = 0.01  # percentage points
TOLERANCE_RULE = "per batch: max|trained - deployed| <= rtol * max|trained| + atol; |top1 change| <= top1_points"
RANDOM_BATCHES = 2  # with evaluate=False: batches of random inputs for the equivalence check
RANDOM_BATCH_SIZE = 8


class ConversionCheckError(RuntimeError):
    """The folded model is not equivalent to the trained one (or cannot take the plain layout)."""


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")  # not guessable: no link planted there
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------
@dataclass
class ConversionResult:
    weights: Path
    sidecar: Path
    info: dict  # the sidecar's content
    torchscript: Path | None = None
    onnx: Path | None = None
    skipped: list[str] = field(default_factory=list)  # one-line notes (e.g. onnx not installed)

    def summary_lines(self) -> list[str]:
        i = self.info
        lines = []
        if i["evaluated"]:
            lines.append(f"top-1 before {i['top1_before']:.2f}% / after {i['top1_after']:.2f}% "
                         f"(change {i['top1_after'] - i['top1_before']:+.2f} points) on {i['val_images']} "
                         f"{i['dataset']} validation images")
        else:
            lines.append("accuracy not measured (--no-eval); outputs compared on random inputs")
        lines.append(f"max output difference {i['max_output_diff']:.3g} (allowed {i['allowed_output_diff']:.3g} "
                     f"= {RTOL:g} x max|logit| {i['max_abs_logit']:.3g} + {ATOL:g})")
        p, f = i["params"], i[MACS_KEY]
        lines.append(f"params: plain {p['plain']:,} | trained {p['trained']:,} | deployed {p['deployed']:,}; "
                     f"MACs: plain {f['plain']:,} | trained {f['trained']:,} | deployed {f['deployed']:,}")
        lines.append(f"{i['blocks_folded']} block(s) folded; weights load strict=True into untouched "
                     f"{i['architecture']}: {self.weights} (+ {self.sidecar.name})")
        if self.torchscript:
            lines.append(f"torchscript: {self.torchscript}")
        if self.onnx:
            lines.append(f"onnx: {self.onnx}")
        lines.extend(self.skipped)
        return lines


def _random_batches(image_size: int, count: int = RANDOM_BATCHES, batch: int = RANDOM_BATCH_SIZE):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, image_size, image_size, generator=gen), None) for _ in range(count)]


def fold_to_plain(model: nn.Module, architecture: str, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(deploy(model), fresh never-grown ``architecture`` holding the folded weights, loaded strictly)."""
    plain = build_model(architecture, num_classes)
    deployed = deploy(model)
    strict_load(plain, deployed.state_dict(),
                f"folded weights do not load strict=True into the untouched {architecture}", ConversionCheckError)
    return deployed, plain.eval()


def new_file_mode(directory: Path) -> int:
    """The permission bits a file created in ``directory`` gets (0o666 less the umask, or a default ACL's).

    Asks the kernel by creating a probe file: reading the umask with ``os.umask`` means setting it, which races
    with every other thread creating files meanwhile.
    """
    probe = directory / f".dyrep-ray-mode-probe-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _complexity(models: dict[str, nn.Module], image_size: int) -> tuple[dict, dict]:
    size = (3, image_size, image_size)
    return ({k: count_params(m) for k, m in models.items()}, {k: count_macs(m, size) for k, m in models.items()})


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    evaluate: bool = True,
    torchscript: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    use_ema: bool = False,
    device: str | torch.device | None = "cpu",
    batch_size: int | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Fold the checkpoint at ``source`` (checkpoint or run directory) into plain weights; see module doc.

    Raises :class:`CheckpointError` (unsafe/corrupt input), :class:`ConversionCheckError` (the
    result would not be equivalent) or data/config errors; writes nothing unless every check passes.
    """
    ckpt_dir = resolve_checkpoint(source)
    refuse_symlinks(ckpt_dir, "checkpoint")
    ckpt = load_checkpoint_safely(ckpt_dir)
    trained, cfg, num_classes = rebuild_trained_model(ckpt, use_ema)
    device = resolve_device(str(device) if device is not None else None)
    out = Path(out) if out is not None else ckpt_dir.parent / DEFAULT_WEIGHTS_NAME
    if out.suffix == ".json":
        raise ConfigError(f"--out {out}: give the weights file (e.g. {out.with_suffix('.safetensors').name}); "
                          "the .json is written beside it")
    side = sidecar_path(out)
    # Every output is checked before anything is written: a device node, FIFO, directory or symlink is refused,
    # never replaced or written through.
    for path, option in ((out, "--out"), (side, "--out's JSON sidecar"), (torchscript, "--torchscript"),
                         (onnx, "--onnx")):
        if path is not None:
            check_output_file(path, option)
    logger.info("converting %s (%s, %d classes, epoch %s, %d blocks)", ckpt_dir, cfg.model, num_classes,
                ckpt.meta.get("epoch"), sum(is_block(m) for m in trained.modules()))

    # Structure: fold, load strictly into the untouched architecture, compare sizes with a never-grown model.
    blocks_folded = sum(is_block(m) for m in trained.modules())
    deployed, plain = fold_to_plain(trained, cfg.model, num_classes)
    # ``plain`` is a freshly built (never-grown) model; loading weights does not change its size.
    params, macs = _complexity({"trained": trained, "deployed": deployed, "plain": plain}, cfg.image_size)
    if params["deployed"] != params["plain"] or macs["deployed"] != macs["plain"]:
        raise ConversionCheckError(
            f"folded model differs in size from a never-grown {cfg.model}: params {params['deployed']:,} vs "
            f"{params['plain']:,}, MACs {macs['deployed']:,} vs {macs['plain']:,}")
    recorded_plain = ckpt.meta.get("plain_params")
    if isinstance(recorded_plain, int) and recorded_plain != params["plain"]:
        raise ConversionCheckError(f"checkpoint records {recorded_plain:,} plain params but {cfg.model} now has "
                                   f"{params['plain']:,}: the architecture changed since training")
    del deployed

    # Write, read back, verify against the trained model; only then move into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "dyrep-ray convert",
                                               "architecture": cfg.model, "num_classes": str(num_classes)})
        os.chmod(tmp, new_file_mode(out.parent))  # safetensors creates 0600 files
        reloaded = build_model(cfg.model, num_classes)
        strict_load(reloaded, load_safetensors_state(tmp), f"{tmp} does not load back", ConversionCheckError)
        reloaded.eval()
        trained.to(device)
        reloaded.to(device)
        if evaluate:
            loader, data_classes = validation_loader(cfg, data_dir, batch_size)
            if data_classes > num_classes:
                raise ConfigError(f"the model has {num_classes} outputs but dataset {cfg.dataset!r} has "
                                  f"{data_classes} classes")
            batches = loader
        else:
            batches = _random_batches(cfg.image_size)
        with exact_float32(device):
            cmp = compare_models(trained, reloaded, batches, device, rtol=RTOL, atol=ATOL, progress=progress,
                                 desc="verify (trained vs deployed)")
        info = {
            "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
            "weights": out.name, "architecture": cfg.model, "num_classes": num_classes,
            "image_size": cfg.image_size, "config": cfg.to_dict(), "dataset": cfg.dataset,
            "data_dir": data_dir if data_dir is not None else cfg.data_dir,
            "source_checkpoint": str(ckpt_dir.resolve()), "epoch": ckpt.meta.get("epoch"),
            "weights_from": "ema" if use_ema else "model", "device": str(device),
            "evaluated": evaluate, "val_images": cmp.reference.get("images", 0),
            "top1_before": cmp.reference.get("top1"), "top1_after": cmp.candidate.get("top1"),
            "top5_before": cmp.reference.get("top5"), "top5_after": cmp.candidate.get("top5"),
            "loss_before": cmp.reference.get("loss"), "loss_after": cmp.candidate.get("loss"),
            "recorded_val_top1": (ckpt.meta.get("metrics") or {}).get("ema_val_top1" if use_ema else "val_top1"),
            "max_output_diff": cmp.max_output_diff, "max_abs_logit": cmp.max_abs_logit,
            "allowed_output_diff": RTOL * cmp.max_abs_logit + ATOL, "compared_batches": cmp.batches,
            "tolerance": {"rtol": RTOL, "atol": ATOL, "top1_points": TOP1_TOLERANCE, "rule": TOLERANCE_RULE},
            "params": params, MACS_KEY: macs, "macs_unit": "multiply-accumulates per image (conv + linear)",
            "blocks_folded": blocks_folded, "strict_load": True,
        }
        _check(info, cmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    info["sha256"] = sha256_file(out)
    result = ConversionResult(out, side, info)
    if evaluate and isinstance(info["recorded_val_top1"], (int, float)) \
            and abs(info["recorded_val_top1"] - info["top1_before"]) > TOP1_TOLERANCE:
        logger.warning("the checkpoint logged val_top1 %.2f but this evaluation measured %.2f: the validation data "
                       "differs from training's (data_dir? dataset files changed?)", info["recorded_val_top1"],
                       info["top1_before"])
    _write_json_atomic(side, info)
    reloaded.to("cpu")
    if torchscript is not None:
        result.torchscript = export_torchscript(reloaded, Path(torchscript), cfg.image_size)
        info["torchscript"] = str(result.torchscript)
    if onnx is not None:
        if importlib.util.find_spec("onnx") is None:
            result.skipped.append(f"onnx: skipped ({onnx} not written): the 'onnx' package is not installed")
        else:
            result.onnx = export_onnx(reloaded, Path(onnx), cfg.image_size)
            info["onnx"] = str(result.onnx)
    if result.torchscript or result.onnx:
        _write_json_atomic(side, info)
    return result


def _check(info: dict, cmp) -> None:
    if cmp.batches == 0 or (info["evaluated"] and not cmp.reference):
        raise ConversionCheckError("nothing to compare: the validation set is empty (fix the data or use --no-eval)")
    problems = []
    if cmp.failures:
        index, diff, allowed = max(cmp.failures, key=lambda t: t[1] / t[2] if t[1] == t[1] else float("inf"))
        problems.append(f"outputs differ by {diff:.3g} on batch {index} (allowed {allowed:.3g} = "
                        f"{RTOL:g} x max|logit| + {ATOL:g}; {len(cmp.failures)} of {cmp.batches} batches out of "
                        "tolerance)")
    if info["evaluated"]:
        change = abs(info["top1_after"] - info["top1_before"])
        if not change <= TOP1_TOLERANCE:
            problems.append(f"top-1 changed from {info['top1_before']:.2f}% to {info['top1_after']:.2f}% "
                            f"(more than {TOP1_TOLERANCE} points)")
    if problems:
        raise ConversionCheckError("folded model is NOT equivalent to the trained one: " + "; ".join(problems)
                                   + "; nothing written")


def export_torchscript(model: nn.Module, path: Path, image_size: int) -> Path:
    """``torch.jit.trace`` of the plain model, checked against it on a random batch."""
    import warnings

    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still works
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
        with torch.no_grad():
            expected = model(example)
            diff = float((torch.jit.load(str(path))(example) - expected).abs().max())
    if not diff <= RTOL * float(expected.abs().max()) + ATOL:
        raise ConversionCheckError(f"torchscript export differs from the model by {diff:.3g}")
    logger.info("wrote torchscript %s (max diff vs eager %.3g)", path, diff)
    return path


def export_onnx(model: nn.Module, path: Path, image_size: int) -> Path:
    """ONNX export (needs the optional ``onnx`` package; batch dimension dynamic)."""
    example = torch.randn(1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # exporter back-ends vary between torch versions
        raise ConversionCheckError(f"onnx export failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    logger.info("wrote onnx %s", path)
    return path
