"""Everything one rank trains, built from the config in one pass: data, model, optimizer, schedule, EMA, resume.

:func:`build_run` goes down the layers once -- seed, data, model (DBB conversion or a checkpoint's structure),
DyRep controller, optimizer, LR schedule, loss scaler, EMA, then the checkpoint's state -- and hands
:class:`~dyrep_ray.engine.loop.Trainer` finished :class:`RunParts`.  The order is the order the random streams
are drawn in: changing it changes a run's numbers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch import nn

from ..models import build_model, count_macs, count_params
from ..models.limits import check_model_size
from ..rep import DyRep, convert_to_dbb, restore_graph
from ..rep.blocks import is_block
from ..rep.dbb_convert import convert_to_dbb_original
from ..rep.optim import param_groups_for
from ..rundir.files import CheckpointMeta
from .checkpoint import LoadedCheckpoint, load_optimizer_state_by_name, set_rng_state
from .compile import check_compile_supported
from .config import TrainConfig, resume_changes
from .data_source import torch_data_source
from .ema import ModelEma
from .midepoch import MID_EPOCH_KEY, EpochProgress
from .protocols import DataFactory, DataSource, TrainContext
from .schedule import LRSchedule
from .state import TrainState

logger = logging.getLogger(__name__)


@dataclass
class RunParts:
    """One rank's finished parts of a run, placed on ``device``; ``state`` (and ``resume_progress``, for a
    checkpoint taken inside an epoch) say where training continues."""

    cfg: TrainConfig
    device: torch.device
    data: DataSource
    num_classes: int
    model: nn.Module
    plain_params: int  # of the model as built, before any DyRep/DBB block: what deployment runs
    plain_macs: int
    channels_last: bool
    dyrep: DyRep | None
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    state: TrainState
    resume_progress: EpochProgress | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_for(model, cfg.weight_decay, filter_bias_and_bn=not cfg.opt_no_filter)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    betas = (cfg.opt_betas[0], cfg.opt_betas[1]) if cfg.opt_betas else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.opt_eps)


def build_dyrep(cfg: TrainConfig, model: nn.Module) -> DyRep | None:
    if not cfg.dyrep:
        return None
    return DyRep(model, metric=cfg.dyrep_metric, grow_topk=cfg.dyrep_grow_topk,
                 cut_threshold=cfg.dyrep_cut_threshold, cut_std_gate=cfg.dyrep_cut_std_gate,
                 init_gamma=cfg.dyrep_init_gamma, max_depth=cfg.dyrep_max_depth, seed=cfg.seed,
                 cut_lone_branch=cfg.dyrep_cut_lone_branch, cut_mode=cfg.dyrep_cut_mode,
                 block_type=cfg.dyrep_block, cut_order=cfg.dyrep_cut_order.value,
                 grow_optim_state=cfg.dyrep_grow_optim_state.value)


def build_static_dbb(cfg: TrainConfig, model: nn.Module) -> list[str]:
    """The static DBB baseline on ``model`` (in place): the original's ``--dbb`` converter (``dbb_convert:
    original``) or every eligible conv with its weights and BatchNorm kept (``every_conv``)."""
    if cfg.dbb_convert == "original":
        return convert_to_dbb_original(model, seed=cfg.seed, block_type=cfg.dyrep_block.value)
    return convert_to_dbb(model, seed=cfg.seed, block_type=cfg.dyrep_block.value)


def model_kwargs(cfg: TrainConfig) -> dict:
    """Regularization options for builders that take them (timm models); omitted when off."""
    return {k: getattr(cfg, k) for k in ("drop_rate", "drop_path_rate") if getattr(cfg, k)}


def count_blocks(model: nn.Module) -> int:
    return sum(is_block(m) for m in model.modules())


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model.to(device, memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs lack this


def tune_kernels(device: torch.device, benchmark: bool) -> None:
    """On CUDA, ``torch.backends.cudnn.benchmark``: cuDNN times the conv algorithms once per new input/weight
    shape and keeps the fastest.  Set at build and again after every structure change (whatever touched the
    global flag in between, the changed model's new shapes are tuned); other devices are left alone."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark


def check_resume_config(meta: dict, cfg: TrainConfig) -> None:
    """Refuse (ConfigError naming the key) a resume that changes a structural key; log the allowed changes."""
    for change in resume_changes(meta.get("config", {}), cfg):
        logger.info("resume: config changed: %s", change)


def resolve_data(data: DataSource | DataFactory | None, cfg: TrainConfig, ctx: TrainContext) -> DataSource:
    if data is None:
        return torch_data_source(cfg, ctx)
    if isinstance(data, DataSource):
        return data
    return data(cfg, ctx)


def build_run(cfg: TrainConfig, ctx: TrainContext, data: DataSource | DataFactory | None = None) -> RunParts:
    """This rank's parts of the run ``cfg`` describes, resumed from ``ctx``'s checkpoint when it has one.

    ``data``: a :class:`DataSource`, or a factory ``(cfg, ctx) -> DataSource`` called after seeding (default:
    torch DataLoaders over the configured dataset).
    """
    if cfg.compile:  # refused before anything is built or written
        check_compile_supported()
    seed_everything(cfg.seed)
    source = resolve_data(data, cfg, ctx)
    num_classes = cfg.num_classes or source.num_classes
    # Counted on the meta device first: a model too large to build is one line, not an out-of-memory kill.
    check_model_size(cfg.model, num_classes, "the config", **model_kwargs(cfg))
    model = build_model(cfg.model, num_classes, **model_kwargs(cfg))
    plain_params = count_params(model)
    plain_macs = count_macs(model, (3, cfg.image_size, cfg.image_size))
    resume = ctx.resume_checkpoint()
    if resume is not None:
        check_resume_config(resume.meta, cfg)
        restore_graph(model, resume.graph)
    elif cfg.dbb:  # the static DBB baseline: convs are blocks from the start
        build_static_dbb(cfg, model)
    channels_last = cfg.channels_last and ctx.device.type == "cuda"
    place_model(model, ctx.device, channels_last)
    tune_kernels(ctx.device, cfg.cudnn_benchmark)
    dyrep = build_dyrep(cfg, model)
    optimizer = build_optimizer(cfg, model)
    parts = RunParts(
        cfg=cfg, device=ctx.device, data=source, num_classes=num_classes, model=model, plain_params=plain_params,
        plain_macs=plain_macs, channels_last=channels_last, dyrep=dyrep, optimizer=optimizer,
        schedule=LRSchedule.from_config(cfg),
        scaler=torch.amp.GradScaler(ctx.device.type) if cfg.amp == "fp16" else None,
        # a copy of the model as restored: it has the checkpoint's structure already
        ema=ModelEma(model, cfg.model_ema_decay) if cfg.model_ema else None,
        state=TrainState())
    if resume is not None:
        load_training_state(parts, resume)
    return parts


def load_training_state(parts: RunParts, ckpt: LoadedCheckpoint) -> None:
    """Load ``ckpt``'s weights, optimizer/DyRep/scaler/EMA state, RNG and progress into ``parts`` (whose model
    already has the checkpoint's structure)."""
    state = ckpt.state
    parts.model.load_state_dict(state["model"], strict=True)
    load_optimizer_state_by_name(parts.optimizer, parts.model, state["optimizer"])
    if parts.dyrep is not None and "dyrep" in state:
        parts.dyrep.load_state_dict(state["dyrep"])
    if parts.scaler is not None and "scaler" in state:
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and "ema" in state:
        parts.ema.module.load_state_dict(state["ema"], strict=True)
    set_rng_state(state["rng"])
    meta = CheckpointMeta.from_json(ckpt.meta)
    parts.state = TrainState(epoch=int(meta.epoch), global_step=int(meta.global_step),
                             history=list(meta.history), skipped_steps=int(meta.skipped_steps))
    if MID_EPOCH_KEY in meta.extra:
        parts.resume_progress = EpochProgress.from_json(meta.extra[MID_EPOCH_KEY])
    logger.info("resumed from %s (epoch %d%s, %d blocks)", ckpt.path, parts.state.epoch,
                f" + {parts.resume_progress.step} steps" if parts.resume_progress else "",
                count_blocks(parts.model))
