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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import UserError
from .layout import GRAPH_FILE, MANIFEST_FILE, META_FILE, STATE_FILE

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupted or not ours."""


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        torch.save(state, tmp / STATE_FILE)
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
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST_FILE} ({exc})") from exc
    for name in (STATE_FILE, META_FILE, GRAPH_FILE):
        path = directory / name
        if name not in files or not path.is_file():
            raise CheckpointError(f"{directory}: missing {name}")
        if path.stat().st_size != files[name]["bytes"] or sha256_file(path) != files[name]["sha256"]:
            raise CheckpointError(f"{directory}: {name} is corrupted (checksum mismatch)")


def load_checkpoint_dir(directory: str | Path, map_location="cpu") -> LoadedCheckpoint:
    """Verify and load a checkpoint without unpickling arbitrary objects."""
    directory = Path(directory)
    verify_checkpoint_dir(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        graph = json.loads((directory / GRAPH_FILE).read_text())
        state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects with UnpicklingError
        raise CheckpointError(f"{directory}: cannot load safely ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    return LoadedCheckpoint(directory, meta, graph, state)


def load_state_file(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for pickled payloads."""
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


def find_valid_checkpoints(root: str | Path, prefix: str = "checkpoint_") -> list[Path]:
    """Checkpoint dirs under ``root`` whose manifest verifies, newest (by epoch) first.

    Invalid ones are skipped with a warning naming the reason.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(prefix):
            continue
        try:
            verify_checkpoint_dir(d)
            meta = json.loads((d / META_FILE).read_text())
            found.append((int(meta["epoch"]), d))
        except (CheckpointError, ValueError, KeyError) as exc:
            logger.warning("ignoring invalid checkpoint: %s", exc)
    return [d for _, d in sorted(found, key=lambda t: t[0], reverse=True)]
