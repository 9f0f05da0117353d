"""Checkpoint -> plain inference model, with proof that folding changed nothing.

:func:`convert_checkpoint` is what ``dyrep-ray convert`` runs:

1. load a checkpoint safely (manifest verified, ``state.pt`` read with ``weights_only=True``;
   a pickled payload is refused with one line and never executed) on the CPU;
2. rebuild the trained model: ``build_model(config.model, num_classes)`` + ``restore_graph`` +
   ``load_state_dict(strict=True)``;
3. fold every Diverse Branch Block (:func:`dyrep_ray.rep.deploy`) and load the result with
   ``strict=True`` into a freshly built, never-grown model of the same architecture; its
   parameter count and FLOPs must equal the never-grown model's;
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

import dataclasses
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.checkpoint import (
    GRAPH_FILE,
    MANIFEST_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    LoadedCheckpoint,
    check_zip_records,
    find_valid_checkpoints,
    read_json_strict,
    sha256_file,
    validate_checkpoint_content,
    verify_checkpoint_dir,
)
from ..engine.config import ConfigError, TrainConfig
from ..models import build_model, count_flops, count_params
from ..models.limits import check_model_size
from ..rep import deploy
from ..rep.blocks import is_block
from ..rundir.layout import DEPLOYED_WEIGHTS as DEFAULT_WEIGHTS_NAME
from .evaluate import compare_models, validation_loader

logger = logging.getLogger(__name__)

RTOL = 1e-4
ATOL = 1e-5
TOP1_TOLERANCE = 0.01  # percentage points
TOLERANCE_RULE = "per batch: max|trained - deployed| <= rtol * max|trained| + atol; |top1 change| <= top1_points"
SIDECAR_FORMAT = "dyrep-ray-deployed"
SIDECAR_VERSION = 1
RANDOM_BATCHES = 2  # with evaluate=False: batches of random inputs for the equivalence check
RANDOM_BATCH_SIZE = 8
# Class counts of datasets whose size is fixed (for checkpoints whose meta lacks num_classes).
KNOWN_NUM_CLASSES = {"synthetic": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
# More classes than this in a meta/sidecar is refused before a classifier head is built (1e7 classes x 2048
# features would be 80 GB); the largest public label sets (ImageNet-21k) are well below it.
MAX_NUM_CLASSES = 100_000


class ConversionCheckError(RuntimeError):
    """The folded model is not equivalent to the trained one (or cannot take the plain layout)."""


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint directory named by ``source``: itself, the directory of a file in it,
    or the newest valid ``checkpoint_*`` of a run directory."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name not in (STATE_FILE, META_FILE, GRAPH_FILE, MANIFEST_FILE):
            raise CheckpointError(f"{path}: not a checkpoint directory, run directory or file of a checkpoint")
        path = path.parent
    if (path / MANIFEST_FILE).exists() or (path / STATE_FILE).exists():
        return path
    found = find_valid_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no valid checkpoint_* directory in it (is it a run directory?)")
    return found[0]


def _read_json_object(path: Path) -> dict:
    try:
        value = read_json_strict(path)  # NaN/Infinity refused: not JSON, and no count/metric may be one
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})".splitlines()[0]) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def load_checkpoint_safely(directory: str | os.PathLike) -> LoadedCheckpoint:
    """Verify the manifest, read the JSON files, then the tensors with ``weights_only=True`` on the CPU.

    A ``state.pt`` carrying pickled objects is refused with a one-line :class:`CheckpointError`;
    nothing in it runs.
    """
    directory = Path(directory)
    verify_checkpoint_dir(directory)
    meta = _read_json_object(directory / META_FILE)
    graph = _read_json_object(directory / GRAPH_FILE)
    state_path = directory / STATE_FILE
    check_zip_records(state_path)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled code; anything else = not ours either
        raise CheckpointError(f"{state_path}: refused to load: it is not a plain tensor file (it may carry pickled "
                              f"code, which dyrep-ray never runs) [{type(exc).__name__}]") from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{state_path}: no 'model' state dict in it")
    validate_checkpoint_content(directory, meta, graph, state)
    return LoadedCheckpoint(directory, meta, graph, state)


def config_from_dict(data: object, source: str) -> TrainConfig:
    """A :class:`TrainConfig` from a stored config dict; keys this version does not know are dropped
    with a warning (a checkpoint written by a newer dyrep-ray still converts)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: no config dict stored")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        logger.warning("%s: ignoring config keys this version does not know: %s", source, unknown)
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known})


def check_num_classes(value, source: str) -> int:
    """``value`` if it is an int in ``[1, MAX_NUM_CLASSES]``, else a one-line :class:`CheckpointError`."""
    if type(value) is not int or not 1 <= value <= MAX_NUM_CLASSES:
        raise CheckpointError(f"{source}: num_classes must be an integer in [1, {MAX_NUM_CLASSES}], "
                              f"got {value!r}"[:200])
    return value


def num_classes_of(meta: dict, cfg: TrainConfig) -> int:
    value = meta.get("num_classes") or cfg.num_classes or KNOWN_NUM_CLASSES.get(cfg.dataset)
    if value is None:
        raise CheckpointError(f"cannot tell the number of classes (meta has no num_classes, dataset {cfg.dataset!r})")
    return check_num_classes(value, "checkpoint meta")


def strict_load(model: nn.Module, state: dict, what: str, error: type[Exception] = CheckpointError) -> None:
    """``load_state_dict(strict=True)`` raising ``error`` with a one-line message that names the keys."""
    expected = model.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise error(f"{what}: entries that are not tensors: {not_tensors[:4]}")
    # Strict means strict: load_state_dict would cast f64/int8/bool/complex weights silently (bool weights
    # reported a loss of 5.6e9), so a dtype that differs from the model's is refused like a shape.
    dtypes = [f"{k} {state[k].dtype} vs {v.dtype}" for k, v in expected.items()
              if k in state and state[k].dtype != v.dtype]
    if dtypes:
        raise error(f"{what}: dtype mismatch {dtypes[:3]}{' ...' if len(dtypes) > 3 else ''}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise error(f"{what}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise error(f"{what}: {str(exc).strip().splitlines()[-1].strip()}") from exc


def rebuild_trained_model(ckpt: LoadedCheckpoint, use_ema: bool = False) -> tuple[nn.Module, TrainConfig, int]:
    """(trained model in eval mode on the CPU, its config, num_classes) from a loaded checkpoint."""
    from ..engine.loop import model_kwargs
    from ..rep import restore_graph

    cfg = config_from_dict(ckpt.meta.get("config"), f"{ckpt.path}/{META_FILE}")
    num_classes = num_classes_of(ckpt.meta, cfg)
    check_model_size(cfg.model, num_classes, f"{ckpt.path}/{META_FILE}", **model_kwargs(cfg))  # meta device
    model = build_model(cfg.model, num_classes, **model_kwargs(cfg))  # as the loop built it (dropout etc.)
    try:
        restore_graph(model, ckpt.graph)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.path}/{GRAPH_FILE}: {exc}") from exc
    key = "ema" if use_ema else "model"
    if key not in ckpt.state:
        raise CheckpointError(f"{ckpt.path}: no EMA weights in this checkpoint (trained without model_ema)")
    strict_load(model, ckpt.state[key], f"{ckpt.path}: {key} weights do not fit the rebuilt {cfg.model}")
    return model.eval(), cfg, num_classes


# ---------------------------------------------------------------------------
# Deployed weights (safetensors + JSON sidecar)
# ---------------------------------------------------------------------------
def sidecar_path(weights: str | os.PathLike) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + ".json")


def read_sidecar(weights: str | os.PathLike) -> dict | None:
    """The JSON written beside ``weights`` by convert, or None if there is none."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    info = _read_json_object(path)
    if info.get("format") != SIDECAR_FORMAT:
        logger.warning("%s is not a dyrep-ray deployed-model description; ignoring it", path)
        return None
    if not isinstance(info.get("architecture"), str) or not info["architecture"]:
        raise CheckpointError(f"{path}: 'architecture' must be a model name (a string)")
    check_num_classes(info.get("num_classes"), str(path))
    if "config" in info and not isinstance(info["config"], dict):
        raise CheckpointError(f"{path}: 'config' must be an object")
    return info


def load_safetensors_state(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})".splitlines()[0]) from exc


def load_deployed(weights: str | os.PathLike, architecture: str | None = None,
                  num_classes: int | None = None) -> nn.Module:
    """The plain model of ``architecture`` (default: from the JSON sidecar) with ``weights`` loaded strictly."""
    info = read_sidecar(weights) or {}
    architecture = architecture or info.get("architecture")
    num_classes = num_classes or info.get("num_classes")
    if not architecture or not num_classes:
        raise CheckpointError(f"{weights}: no {sidecar_path(weights).name} beside it naming the architecture; "
                              "pass the architecture and num_classes")
    check_model_size(architecture, int(num_classes), str(sidecar_path(weights)))  # meta device: nothing allocated
    model = build_model(architecture, int(num_classes))
    strict_load(model, load_safetensors_state(weights), f"{weights} does not load into {architecture}")
    return model.eval()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------
@contextmanager
def exact_float32(device: torch.device):
    """No TF32 on CUDA while verifying (TF32 convs alone drift ~1e-3 relative)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is visible; use --device cpu")
    return device


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
        p, f = i["params"], i["flops"]
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


def _complexity(models: dict[str, nn.Module], image_size: int) -> tuple[dict, dict]:
    size = (3, image_size, image_size)
    return ({k: count_params(m) for k, m in models.items()}, {k: count_flops(m, size) for k, m in models.items()})


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
    ckpt = load_checkpoint_safely(ckpt_dir)
    trained, cfg, num_classes = rebuild_trained_model(ckpt, use_ema)
    device = resolve_device(str(device) if device is not None else None)
    out = Path(out) if out is not None else ckpt_dir.parent / DEFAULT_WEIGHTS_NAME
    if out.suffix == ".json":
        raise ConfigError(f"--out {out}: give the weights file (e.g. {out.with_suffix('.safetensors').name}); "
                          "the .json is written beside it")
    side = sidecar_path(out)
    logger.info("converting %s (%s, %d classes, epoch %s, %d blocks)", ckpt_dir, cfg.model, num_classes,
                ckpt.meta.get("epoch"), sum(is_block(m) for m in trained.modules()))

    # Structure: fold, load strictly into the untouched architecture, compare sizes with a never-grown model.
    blocks_folded = sum(is_block(m) for m in trained.modules())
    deployed, plain = fold_to_plain(trained, cfg.model, num_classes)
    # ``plain`` is a freshly built (never-grown) model; loading weights does not change its size.
    params, flops = _complexity({"trained": trained, "deployed": deployed, "plain": plain}, cfg.image_size)
    if params["deployed"] != params["plain"] or flops["deployed"] != flops["plain"]:
        raise ConversionCheckError(
            f"folded model differs in size from a never-grown {cfg.model}: params {params['deployed']:,} vs "
            f"{params['plain']:,}, MACs {flops['deployed']:,} vs {flops['plain']:,}")
    recorded_plain = ckpt.meta.get("plain_params")
    if isinstance(recorded_plain, int) and recorded_plain != params["plain"]:
        raise ConversionCheckError(f"checkpoint records {recorded_plain:,} plain params but {cfg.model} now has "
                                   f"{params['plain']:,}: the architecture changed since training")
    del deployed

    # Write, read back, verify against the trained model; only then move into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "dyrep-ray convert",
                                               "architecture": cfg.model, "num_classes": str(num_classes)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files
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
            "params": params, "flops": flops, "flops_unit": "MACs per image (conv + linear)",
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
