"""Validation-set evaluation for ``convert`` and ``eval``: top-1 / top-5 / loss, optionally paired.

:func:`evaluate_model` measures one model; :func:`compare_models` runs two models on the
same batches in one pass (the DyRep model and its folded copy) and also records how far
their logits drift apart, batch by batch.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import build_datasets
from ..engine.config import ConfigError, TrainConfig
from ..engine.data_source import PARQUET, aug_options

logger = logging.getLogger(__name__)


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



def check_checkpoint_model_size(ckpt_dir) -> None:
    """Refuse (one line) a checkpoint whose meta names a model too large to build, before its state is loaded or
    anything is built: the model is counted on the meta device (:mod:`dyrep_ray.models.limits`)."""
    from ..engine.assembly import model_kwargs
    from ..models.limits import check_model_size
    from ..rundir.checkpoints import read_meta
    from ..rundir.layout import META_FILE
    from ..rundir.storage import RunStorage
    from .weights import config_from_dict, num_classes_of

    where = f"{ckpt_dir}/{META_FILE}"
    meta = read_meta(RunStorage(str(ckpt_dir.parent.parent), ckpt_dir.parent.name), ckpt_dir.name)
    if meta is None:  # the checkpoint loader says what is wrong with it
        return
    cfg = config_from_dict(meta.get("config"), where)
    check_model_size(cfg.model, num_classes_of(meta, cfg), where, **model_kwargs(cfg))


def validation_dataset(cfg: TrainConfig, data_dir: str | None = None):
    """(validation dataset of ``cfg``, its class count), built as the training loop builds it.

    ``data_dir`` overrides ``cfg.data_dir``; for ``dataset: parquet`` it replaces ``parquet_val``.
    """
    aug = aug_options(cfg)  # exactly as the training loop builds its datasets
    if cfg.dataset == PARQUET:
        from ..data.parquet import ParquetImageDataset, read_parquet_metadata, sample_transform

        source = data_dir or cfg.parquet_val or cfg.parquet_train
        meta = read_parquet_metadata(source)
        transform = sample_transform(meta["dataset"], train=False, image_size=cfg.image_size, aug=aug)
        return ParquetImageDataset(source, transform), int(meta["num_classes"])
    _, val_ds, num_classes = build_datasets(
        cfg.dataset, data_dir if data_dir is not None else cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed,
        synthetic_train_size=cfg.synthetic_train_size, synthetic_val_size=cfg.synthetic_val_size, aug=aug)
    return val_ds, num_classes


def validation_loader(cfg: TrainConfig, data_dir: str | None = None,
                      batch_size: int | None = None) -> tuple[DataLoader, int]:
    """(loader over the validation split of ``cfg``'s dataset, the dataset's class count).

    ``data_dir`` overrides ``cfg.data_dir``.  The split, transforms and synthetic seed are the
    ones the training loop used, so the accuracy matches what the run logged.
    """
    val_ds, num_classes = validation_dataset(cfg, data_dir)
    loader = DataLoader(val_ds, batch_size=batch_size or cfg.val_batch_size or cfg.batch_size, shuffle=False,
                        num_workers=cfg.num_data_workers)
    return loader, num_classes


@dataclass
class _Accumulator:
    loss: float = 0.0
    top1: int = 0
    top5: int = 0
    n: int = 0

    def add(self, logits: Tensor, targets: Tensor) -> None:
        logits = logits.float()
        self.loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        self.top1 += int(hit[:, :1].sum())
        self.top5 += int(hit.sum())
        self.n += int(targets.numel())

    def result(self) -> dict:
        n = max(self.n, 1)
        return {"top1": 100.0 * self.top1 / n, "top5": 100.0 * self.top5 / n, "loss": self.loss / n,
                "images": self.n}


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    try:
        from tqdm import tqdm
    except ImportError:  # optional nicety
        return loader

    return tqdm(loader, desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device | str = "cpu", *, progress: bool = False,
                   desc: str = "eval") -> dict:
    """``{"top1", "top5", "loss", "images"}`` of ``model`` (eval mode; its mode is restored)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = _Accumulator()
    try:
        for images, targets in _progress(loader, progress, desc):
            acc.add(model(images.to(device)), targets.to(device))
    finally:
        model.train(was_training)
    return acc.result()


@dataclass
class Comparison:
    """Two models measured on the same batches."""

    reference: dict
    candidate: dict
    max_output_diff: float = 0.0  # max |ref(x) - cand(x)| over every batch
    max_abs_logit: float = 0.0  # max |ref(x)| over every batch
    worst_ratio: float = 0.0  # max over batches of diff / (rtol * max|ref| + atol); > 1 = out of tolerance
    batches: int = 0
    failures: list = field(default_factory=list)  # (batch index, diff, allowed)


@torch.no_grad()
def compare_models(reference: nn.Module, candidate: nn.Module, batches, device: torch.device | str = "cpu", *,
                   rtol: float, atol: float, progress: bool = False, desc: str = "verify") -> Comparison:
    """Run both models (eval mode) on every ``(images, targets)`` batch; accuracy of each + logit drift.

    A batch is within tolerance when ``max|ref - cand| <= rtol * max|ref| + atol`` on that batch.
    ``targets`` may be ``None`` (random inputs): then only the drift is measured.
    """
    device = torch.device(device)
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    ref_acc, cand_acc = _Accumulator(), _Accumulator()
    result = Comparison({}, {})
    try:
        for index, (images, targets) in enumerate(_progress(batches, progress, desc)):
            images = images.to(device)
            a = reference(images).float()
            b = candidate(images).float()
            if targets is not None:
                targets = targets.to(device)
                ref_acc.add(a, targets)
                cand_acc.add(b, targets)
            diff = float((a - b).abs().max())
            scale = float(a.abs().max())
            allowed = rtol * scale + atol
            if not (diff <= allowed):  # NaN counts as a failure
                result.failures.append((index, diff, allowed))
            result.max_output_diff = max(result.max_output_diff, diff) if diff == diff else float("nan")
            result.max_abs_logit = max(result.max_abs_logit, scale)
            result.worst_ratio = max(result.worst_ratio, diff / allowed) if diff == diff else float("inf")
            result.batches += 1
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    result.reference = ref_acc.result() if ref_acc.n else {}
    result.candidate = cand_acc.result() if cand_acc.n else {}
    return result


# ---------------------------------------------------------------------------
# ``dyrep-ray eval``: whatever the user points at -> model + config
# ---------------------------------------------------------------------------
PLAIN_STATE_SUFFIXES = (".pt", ".pth", ".bin")


def evaluate_weights(
    weights: str,
    config: str | None = None,
    overrides=(),
    *,
    data_dir: str | None = None,
    device: str | None = "cpu",
    batch_size: int | None = None,
    use_ema: bool = False,
    progress: bool = False,
) -> dict:
    """Top-1/top-5/loss of ``weights`` on the validation set of its config.

    ``weights``: a deployed ``.safetensors`` (architecture and config from the JSON convert wrote
    beside it, else from ``config``), a checkpoint or run directory (model and config from the
    checkpoint), or a plain state-dict file (``.pt``/``.pth``, loaded with ``weights_only=True``;
    needs ``config``).  ``config`` (YAML) and ``overrides`` (``key=value``) apply on top of the
    stored config; the architecture always comes from the weights' own description when there is one.
    """
    from pathlib import Path

    from ..engine.checkpoint import STATE_FILE, CheckpointError, load_state_file
    from ..engine.config import ConfigError, load_config
    from ..models import build_model
    from .weights import (
        config_from_dict,
        load_checkpoint_safely,
        load_safetensors_state,
        read_sidecar,
        rebuild_trained_model,
        resolve_checkpoint,
        sidecar_path,
        strict_load,
    )

    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    dev = resolve_device(device)

    def need_config(why: str):
        if config is None and not any(o.startswith("model=") for o in overrides):
            raise ConfigError(f"{path}: {why}; pass -c CONFIG (or --set model=... --set dataset=...)")

    arch = num_classes = None
    state = None
    model = None
    if path.is_file() and path.suffix == ".safetensors":
        sidecar = read_sidecar(path)
        if sidecar is None:
            need_config(f"no {sidecar_path(path).name} beside it to name the model and dataset")
            base = None
        else:
            base = config_from_dict(sidecar.get("config"), str(sidecar_path(path))).to_dict()
            arch, num_classes = sidecar.get("architecture"), sidecar.get("num_classes")
        cfg = load_config(config, list(overrides), base=base)
        state = load_safetensors_state(path)
        source = f"deployed weights {path}"
    elif path.is_file() and path.suffix in PLAIN_STATE_SUFFIXES and path.name != STATE_FILE:
        need_config("a plain state-dict file does not say which model it is")
        cfg = load_config(config, list(overrides))
        state = load_state_file(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a state dict ({type(state).__name__})")
        source = f"state dict {path}"
    else:
        ckpt_dir = resolve_checkpoint(path)
        check_checkpoint_model_size(ckpt_dir)
        ckpt = load_checkpoint_safely(ckpt_dir)
        model, ckpt_cfg, num_classes = rebuild_trained_model(ckpt, use_ema)
        cfg = load_config(config, list(overrides), base=ckpt_cfg.to_dict())
        arch = ckpt_cfg.model
        source = f"checkpoint {ckpt.path} (epoch {ckpt.meta.get('epoch')}{', EMA' if use_ema else ''})"
    if arch is not None and cfg.model != arch:
        logger.warning("config names model %r but the weights are a %r; evaluating %r", cfg.model, arch, arch)
    arch = arch or cfg.model
    loader, data_classes = validation_loader(cfg, data_dir, batch_size)
    num_classes = num_classes or cfg.num_classes or data_classes
    if data_classes > num_classes:
        raise ConfigError(f"the model has {num_classes} outputs but dataset {cfg.dataset!r} has {data_classes} "
                          "classes")
    if model is None:
        from ..models.limits import check_model_size

        check_model_size(arch, int(num_classes), source)  # counted on the meta device: nothing allocated
        model = build_model(arch, int(num_classes))
        strict_load(model, state, f"{path} does not load into {arch} ({num_classes} classes)")
    model.to(dev)
    logger.info("evaluating %s (%s) on %d %s validation images", source, arch, len(loader.dataset), cfg.dataset)
    with exact_float32(dev):
        result = evaluate_model(model, loader, dev, progress=progress, desc="eval")
    return {**result, "model": arch, "num_classes": int(num_classes), "dataset": cfg.dataset, "source": source}
