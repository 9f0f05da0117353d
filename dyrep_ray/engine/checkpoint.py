"""Training checkpoints: structure graph (JSON) + tensors, written atomically, loaded safely.

Layout of a checkpoint directory::

    meta.json        epoch, global step, config, metrics history, best metric (JSON)
    structure.json   the DyRep structure graph (JSON, human readable)
    state.pt         tensors only: model, optimizer (keyed by parameter *name*), EMA,
                     AMP scaler, DyRep accumulators, RNG states
    MANIFEST.json    sha256 + size of every file above; written last

Loading verifies the manifest, then reads ``state.pt`` with
``torch.load(weights_only=True)``: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import UserError
from ..rundir.layout import GRAPH_FILE, MANIFEST_FILE, META_FILE, STATE_FILE

# Marks the sibling temp dir a checkpoint is written into (removed on the next run if a kill left it).
TEMP_MARK = ".tmp-"

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


# state.pt is a zip of *stored* (uncompressed) records when torch writes it: a record that is compressed, or
# records declaring more bytes than the file holds, can only be a decompression bomb (or not ours).
_ZIP_STORED = 0
# Checkpoint geometry bounds checked before anything is built from a structure graph.
MAX_GRAPH_BLOCKS = 100_000
MAX_KERNEL_SIZE = 31


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupted or not ours."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only, ...); an OSError so every writer's
    "checkpoint NOT written" handler catches it, whatever layer (torch's RuntimeError included) raised it."""


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict
    graph: dict
    state: dict


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint_dir(directory: str | Path, *, state: dict, meta: dict, graph: dict) -> Path:
    """Write a complete checkpoint into ``directory`` (must not exist) atomically.

    Files go to a sibling temp dir first, the manifest last, then one rename; a
    crash leaves either no directory or a complete one.  Errors (e.g. disk full)
    propagate after the temp dir is removed.
    """
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would make the checkpoint the one directory of the run others cannot read; mkdir's
    # 0777 less the umask gives it the mode of every other directory the run creates.
    tmp = directory.parent / f".{directory.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp, 0o777)
    try:
        try:
            torch.save(state, tmp / STATE_FILE)
        except RuntimeError as exc:  # torch reports ENOSPC / EIO from its zip writer as RuntimeError
            raise CheckpointWriteError(f"torch.save failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                from exc
        _write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta})
        _write_json(tmp / GRAPH_FILE, graph)
        files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in (STATE_FILE, META_FILE, GRAPH_FILE)}
        _write_json(tmp / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "files": files})
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checkpoint_dir(directory: str | Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST_FILE} (incomplete or not a dyrep-ray checkpoint)")
    try:
        manifest = read_json_strict(manifest_path)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST_FILE} ({exc})".splitlines()[0]) from exc
    for name in (STATE_FILE, META_FILE, GRAPH_FILE):
        path = directory / name
        if name not in files or not path.is_file():
            raise CheckpointError(f"{directory}: missing {name}")
        entry = files[name]
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int
                or not isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{directory}: {MANIFEST_FILE} entry for {name} is malformed "
                                  "(needs integer 'bytes' and string 'sha256')")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{directory}: {name} is corrupted (checksum mismatch)")


def read_json_strict(path: str | Path):
    """JSON from ``path``; ``NaN``/``Infinity`` (not JSON) are refused with ValueError."""
    def refuse(value: str):
        raise ValueError(f"non-finite number {value} is not valid JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def check_zip_records(path: str | Path) -> None:
    """Refuse a torch zip file whose records are compressed or declare more bytes than the file holds
    (a few KB that would decompress to GBs).  Non-zip (legacy) files are left to ``torch.load``."""
    import zipfile

    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable tensor file ({exc})".splitlines()[0]) from exc
    if any(r.compress_type != _ZIP_STORED for r in records):
        raise CheckpointError(f"{path}: refused: holds compressed records (torch.save never writes them; "
                              "it could decompress to far more memory than its size)")
    declared = sum(r.file_size for r in records)
    if declared > size:
        raise CheckpointError(f"{path}: refused: its records declare {declared} bytes but the file has {size}")


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT_KEYS = ("weight", "bias", "running_mean", "running_var")


def _is_pos_int(value, upper: int | None = None) -> TypeGuard[int]:
    return type(value) is int and value >= 1 and (upper is None or value <= upper)


def validate_checkpoint_content(directory, meta, graph, state) -> None:
    """Types and geometry a checkpoint must have before anything is built from it.

    Catches what the manifest cannot (a checkpoint written, or re-manifested, with bad content): meta
    epoch/step not ints, structure entries not well-formed, block geometry that no tensor in the state has
    (a tiny structure.json asking for 20000 channels), non-float weights.  Raises :class:`CheckpointError`.
    """
    from ..rep.blocks import GRAPH_ENTRY_TYPES
    from ..rep.geometry import BRANCH_NAMES
    from ..rep.replaced_bn import GRAPH_ENTRY_TYPE as IDENTITY_BN

    block_entry_types = tuple(GRAPH_ENTRY_TYPES.values())  # "dbb", "online"

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{directory}: {what}")

    if not isinstance(meta, dict):
        raise bad(f"{META_FILE} is not a JSON object")
    for key in ("epoch", "global_step"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise bad(f"{META_FILE} {key!r} must be a non-negative integer, got {meta.get(key)!r}"[:200])
    if "history" in meta and not isinstance(meta["history"], list):
        raise bad(f"{META_FILE} 'history' must be a list")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise bad(f"{STATE_FILE} holds no 'model' state dict")
    model_state = state["model"]
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise bad(f"{STATE_FILE} model entry {key!r} is not a named tensor")
        if value.is_complex() or (key.rsplit(".", 1)[-1] in _FLOAT_KEYS and value.dtype not in _FLOAT_DTYPES):
            raise bad(f"{STATE_FILE} model tensor {key!r} has dtype {value.dtype} (weights must be floating point)")
    if not isinstance(graph, dict) or not isinstance(graph.get("blocks"), list):
        raise bad(f"{GRAPH_FILE} is not a structure graph (an object with a 'blocks' list)")
    if len(graph["blocks"]) > MAX_GRAPH_BLOCKS:
        raise bad(f"{GRAPH_FILE} lists {len(graph['blocks'])} blocks")
    paths = set()
    for entry in graph["blocks"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise bad(f"{GRAPH_FILE} has an entry without a module path: {entry!r}"[:200])
        path = entry["path"]
        if path in paths:
            raise bad(f"{GRAPH_FILE} lists module {path!r} twice")
        paths.add(path)
        if entry.get("type") == "conv":
            if not isinstance(entry.get("bias"), bool) or not isinstance(entry.get("orig_bias"), bool):
                raise bad(f"{GRAPH_FILE} conv entry {path!r} needs boolean 'bias' and 'orig_bias'")
            continue
        if entry.get("type") == IDENTITY_BN:
            if not (_is_pos_int(entry.get("num_features")) and type(entry.get("eps")) is float
                    and all(isinstance(entry.get(k), bool) for k in ("affine", "track_running_stats"))):
                raise bad(f"{GRAPH_FILE} identity_bn entry {path!r} needs an int 'num_features', a float 'eps' "
                          f"and boolean 'affine' and 'track_running_stats'")
            continue
        if entry.get("type") not in block_entry_types:
            raise bad(f"{GRAPH_FILE} entry {path!r} has unknown type {entry.get('type')!r}")
        if entry["type"] == "online" and not isinstance(entry.get("bias"), bool):
            raise bad(f"{GRAPH_FILE} online block {path!r} needs a boolean 'bias'")
        in_c, out_c, k, groups = (entry.get(key) for key in ("in_channels", "out_channels", "kernel_size", "groups"))
        stride, padding = entry.get("stride"), entry.get("padding")
        if not (_is_pos_int(in_c) and _is_pos_int(out_c) and _is_pos_int(k, MAX_KERNEL_SIZE) and _is_pos_int(groups)
                and _is_pos_int(stride, k) and type(padding) is int and 0 <= padding <= k
                and in_c % groups == 0 and out_c % groups == 0):
            raise bad(f"{GRAPH_FILE} block {path!r} has invalid geometry "
                      f"(in {in_c!r}, out {out_c!r}, k {k!r}, stride {stride!r}, padding {padding!r}, "
                      f"groups {groups!r})"[:300])
        branches = entry.get("branches")
        if (not isinstance(branches, list) or not branches or len(set(map(str, branches))) != len(branches)
                or any(b not in BRANCH_NAMES for b in branches)):
            raise bad(f"{GRAPH_FILE} block {path!r} has invalid branches {branches!r} "
                      f"(a list of distinct names from {list(BRANCH_NAMES)})"[:300])
        if not isinstance(entry.get("orig_bias"), bool):
            raise bad(f"{GRAPH_FILE} block {path!r} needs a boolean 'orig_bias'")
        kxk_shape = (out_c, in_c // groups, k, k)
        prefix = f"{path}."
        if not any(key.startswith(prefix) and tuple(t.shape) == kxk_shape for key, t in model_state.items()):
            raise bad(f"{GRAPH_FILE} block {path!r} geometry {kxk_shape} matches no tensor in {STATE_FILE}")


def load_checkpoint_dir(directory: str | Path, map_location="cpu") -> LoadedCheckpoint:
    """Verify and load a checkpoint without unpickling arbitrary objects."""
    directory = Path(directory)
    verify_checkpoint_dir(directory)
    check_zip_records(directory / STATE_FILE)
    try:
        meta = read_json_strict(directory / META_FILE)
        graph = read_json_strict(directory / GRAPH_FILE)
        state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise CheckpointError(f"{directory}: cannot load safely ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    validate_checkpoint_content(directory, meta, graph, state)
    return LoadedCheckpoint(directory, meta, graph, state)


def load_state_file(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for pickled payloads."""
    check_zip_records(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: refused to load (not a plain tensor file; it may carry pickled code): "
            f"{type(exc).__name__}".splitlines()[0]) from exc


# ---------------------------------------------------------------------------
# Optimizer state keyed by parameter name (param order changes with structure)
# ---------------------------------------------------------------------------
def optimizer_state_by_name(optimizer: Optimizer, model: nn.Module) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    groups, state = [], {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({"hyper": hyper, "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            if p in optimizer.state and optimizer.state[p]:
                state[names[id(p)]] = dict(optimizer.state[p])
    return {"groups": groups, "state": state}


def load_optimizer_state_by_name(optimizer: Optimizer, model: nn.Module, saved: dict) -> None:
    """Restore the saved per-parameter state (momentum buffers, Adam moments, steps) into ``optimizer``.

    The param groups and their hyperparameters (lr, weight_decay, momentum, nesterov, betas, eps) stay those
    of ``optimizer``, i.e. of the config the run resumes with: a changed ``--set weight_decay=...`` takes
    effect instead of being overridden by the checkpoint. Each group keeps the saved parameter order where it
    holds the same parameters (state is matched by parameter name, so group layout changes are harmless).
    """
    params = dict(model.named_parameters())
    missing = [n for g in saved["groups"] for n in g["params"] if n not in params]
    missing += [n for n in saved["state"] if n not in params and n not in missing]
    if missing:
        raise CheckpointError(f"optimizer state names parameters the model lacks: {missing[:3]}")
    names = {id(p): n for n, p in params.items()}
    saved_order = {n: i for i, n in enumerate(n for g in saved["groups"] for n in g["params"])}
    for group in optimizer.param_groups:
        group["params"].sort(key=lambda p: saved_order.get(names.get(id(p), ""), len(saved_order)))
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    unheld = [n for n in saved["state"] if n not in index]
    if unheld:
        raise CheckpointError(f"optimizer state names parameters the optimizer does not train: {unheld[:3]}")
    current_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    torch_state = {
        "state": {index[n]: s for n, s in saved["state"].items()},
        "param_groups": [{**hyper, "params": [index[names[id(p)]] for p in group["params"]]}
                         for hyper, group in zip(current_groups, optimizer.param_groups)],
    }
    optimizer.load_state_dict(torch_state)


# ---------------------------------------------------------------------------
# RNG state (tensors / ints only, so weights_only loading accepts it)
# ---------------------------------------------------------------------------
def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [py_version, list(py_state),
                                                          py_gauss if py_gauss is not None else "none"]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), None if gauss == "none" else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_valid_checkpoints(root: str | Path) -> list[Path]:
    """The run's own checkpoint dirs (``checkpoint_epochNNNN[_stepS]``) whose manifest verifies, newest first
    by the ``(epoch, global_step)`` their meta records.  Invalid ones are skipped with a warning naming the reason.
    """
    from ..rundir.checkpoints import list_checkpoints
    from ..rundir.storage import RunStorage

    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in list_checkpoints(RunStorage(str(root.parent), root.name)):
        directory = root / entry.name
        try:
            if not entry.meta_ok:
                raise CheckpointError(f"{directory}: unreadable {META_FILE} (no integer epoch/global_step)")
            verify_checkpoint_dir(directory)
            found.append(directory)
        except (CheckpointError, OSError) as exc:
            logger.warning("ignoring invalid checkpoint: %s", exc)
    return found
