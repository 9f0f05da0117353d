"""Reading weights: checkpoints (verified, tensors only), their stored config and class count, strict loading
into a model, and the deployed model's safetensors + JSON sidecar.

Shared by ``convert`` (which writes deployed weights) and ``eval`` (which reads either kind).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..data.synthetic import SYNTHETIC_NUM_CLASSES
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
    validate_checkpoint_content,
    verify_checkpoint_dir,
)
from ..engine.config import DATASET_NUM_CLASSES, ConfigError, TrainConfig
from ..limits import MAX_NUM_CLASSES
from ..models import build_model
from ..models.limits import check_model_size

logger = logging.getLogger(__name__)

#: The ``format`` and ``version`` of the JSON sidecar convert writes beside deployed weights.
SIDECAR_FORMAT = "dyrep-ray-deployed"
SIDECAR_VERSION = 1
IMAGENET_NUM_CLASSES = 1000
# Class counts of datasets whose size is fixed (for checkpoints whose meta lacks num_classes).
KNOWN_NUM_CLASSES = {**DATASET_NUM_CLASSES, "synthetic": SYNTHETIC_NUM_CLASSES, "imagenet": IMAGENET_NUM_CLASSES}


# ---------------------------------------------------------------------------
# Checkpoints
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
    from ..engine.assembly import model_kwargs
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
