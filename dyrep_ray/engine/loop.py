"""The DyRep training loop: one implementation for Ray Train workers and ``--local``.

The runtime (single process or a Ray Train worker) is a context object
(:class:`~dyrep_ray.engine.context.LocalContext` or the Ray one) that wraps the
model for DDP, broadcasts rank 0's plan, reduces tensors and persists checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data import build_datasets
from ..models import build_model, count_flops, count_params
from ..rep import DyRep, apply_plan, recalibrate_bn, restore_graph, structure_graph
from ..rep.dbb import DiverseBranchBlock
from ..rep.optim import param_groups_for
from .checkpoint import (
    LoadedCheckpoint,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    rng_state,
    set_rng_state,
    write_checkpoint_dir,
)
from .config import TrainConfig
from .ema import ModelEma
from .layout import CONFIG_FILE, METRICS_FILE, STRUCTURE_FILE
from .faults import maybe_inject, poison_loss
from .schedule import LRSchedule

logger = logging.getLogger(__name__)

# Offset separating the BN-recalibration sampler seeds from the training sampler's.
RECAL_SEED_OFFSET = 100_003
PARQUET = "parquet"


class NonFiniteLossError(RuntimeError):
    """Raised with ``on_nonfinite: stop`` when a step produces a non-finite loss/gradient."""


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    history: list = field(default_factory=list)
    skipped_steps: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups_for(model, cfg.weight_decay, filter_bias_and_bn=not cfg.opt_no_filter)
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    betas = tuple(cfg.opt_betas) if cfg.opt_betas else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.opt_eps)


AUG_KEYS = ("aa", "reprob", "remode", "color_jitter", "cutout_length", "interpolation", "image_mean", "image_std")


def aug_options(cfg: TrainConfig) -> dict:
    """The augmentation/normalization options the datasets are built with (train loop, eval, convert)."""
    return {k: getattr(cfg, k) for k in AUG_KEYS}


def model_kwargs(cfg: TrainConfig) -> dict:
    """Regularization options for builders that take them (timm models); omitted when off."""
    return {k: getattr(cfg, k) for k in ("drop_rate", "drop_path_rate") if getattr(cfg, k)}


def count_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, DiverseBranchBlock) for m in model.modules())


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Holds everything one rank needs; :meth:`fit` runs all epochs."""

    def __init__(self, cfg: TrainConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.device = ctx.device
        seed_everything(cfg.seed)
        aug = aug_options(cfg)
        self.shards = None  # Ray Data shards (dataset "parquet" under Ray Train)
        if cfg.dataset == PARQUET:
            num_classes = self._setup_parquet(aug)
        else:
            self.train_ds, self.val_ds, num_classes = build_datasets(
                cfg.dataset, cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed,
                synthetic_train_size=cfg.synthetic_train_size, synthetic_val_size=cfg.synthetic_val_size, aug=aug)
        self.num_classes = cfg.num_classes or num_classes
        self.model = build_model(cfg.model, self.num_classes, **model_kwargs(cfg))
        self.plain_params = count_params(self.model)
        self.plain_flops = count_flops(self.model, (3, cfg.image_size, cfg.image_size))
        self.state = TrainState()
        resume = ctx.resume_checkpoint()
        if resume is not None:
            restore_graph(self.model, resume.graph)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.dyrep = None
        if cfg.dyrep:
            self.dyrep = DyRep(self.model, metric=cfg.dyrep_metric, grow_topk=cfg.dyrep_grow_topk,
                               cut_threshold=cfg.dyrep_cut_threshold, cut_std_gate=cfg.dyrep_cut_std_gate,
                               init_gamma=cfg.dyrep_init_gamma, max_depth=cfg.dyrep_max_depth, seed=cfg.seed)
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = LRSchedule.from_config(cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.ema = ModelEma(self.model, cfg.model_ema_decay) if cfg.model_ema else None
        if resume is not None:
            self._load(resume)
        self.wrapped = ctx.wrap_model(self.model)
        self._build_loaders()

    # ---------------------------------------------------------------- data
    def _setup_parquet(self, aug: dict) -> int:
        """Parquet shards: Ray Data shards per worker under Ray Train, a torch Dataset under --local."""
        from ..data.parquet import ParquetImageDataset, build_batch_decoder, parquet_row_count, read_parquet_metadata

        cfg = self.cfg
        meta = read_parquet_metadata(cfg.parquet_train)
        source = meta["dataset"]
        train_shard = self.ctx.dataset_shard("train")
        if train_shard is not None:
            self.shards = {"train": train_shard, "val": self.ctx.dataset_shard("val")}
            self.decoders = {split: build_batch_decoder(source, train=split == "train", image_size=cfg.image_size,
                                                        aug=aug) for split in ("train", "val")}
            self.train_rows = parquet_row_count(cfg.parquet_train)
            self.val_rows = parquet_row_count(cfg.parquet_val or cfg.parquet_train)
        else:
            from ..data.parquet import sample_transform

            self.train_ds = ParquetImageDataset(cfg.parquet_train, sample_transform(
                source, train=True, image_size=cfg.image_size, aug=aug))
            self.val_ds = ParquetImageDataset(cfg.parquet_val or cfg.parquet_train, sample_transform(
                source, train=False, image_size=cfg.image_size, aug=aug))
        return int(meta["num_classes"])

    def _train_batches(self, epoch: int):
        if self.shards is None:
            self.train_sampler.set_epoch(epoch)
            return self.train_loader
        from ..data.parquet import iter_decoded_batches

        return iter_decoded_batches(self.shards["train"], self.decoders["train"], batch_size=self.cfg.batch_size,
                                    local_shuffle_buffer_size=4 * self.cfg.batch_size,
                                    local_shuffle_seed=self.cfg.seed + epoch)

    def _steps_per_epoch(self) -> int:
        if self.shards is None:
            return len(self.train_loader)
        return max(math.ceil(self.train_rows / self.ctx.world_size / self.cfg.batch_size), 1)

    def _val_batches(self):
        if self.shards is None:
            return self.val_loader
        from ..data.parquet import iter_decoded_batches

        shard = self.shards["val"] if self.shards["val"] is not None else self.shards["train"]
        return iter_decoded_batches(shard, self.decoders["val"], batch_size=self.cfg.val_batch_size
                                    or self.cfg.batch_size)

    def _dataset_sizes(self) -> tuple[int, int]:
        if self.shards is not None:
            return self.train_rows, self.val_rows
        return len(self.train_ds), len(self.val_ds)

    def _build_loaders(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # Recal source for Ray Data shards (they cannot be re-read out of step): the epoch's last batches.
        self._recent_batches = deque(maxlen=cfg.dyrep_recal_bn_iters)
        if self.shards is not None:
            return
        self.train_sampler = DistributedSampler(self.train_ds, num_replicas=ctx.world_size, rank=ctx.rank,
                                                shuffle=True, seed=cfg.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       num_workers=cfg.num_data_workers, pin_memory=pin, drop_last=False,
                                       persistent_workers=cfg.num_data_workers > 0)
        val_indices = list(range(ctx.rank, len(self.val_ds), ctx.world_size))  # no padding: exact metrics
        self.val_loader = DataLoader(torch.utils.data.Subset(self.val_ds, val_indices),
                                     batch_size=cfg.val_batch_size or cfg.batch_size, shuffle=False,
                                     num_workers=cfg.num_data_workers, pin_memory=pin)

    def _recal_batches(self, salt: int):
        """Deterministic per-(seed, salt, rank) batches for BN recalibration."""
        if self.shards is not None:
            for images in list(self._recent_batches):
                yield self._to_device(images)
            return
        sampler = DistributedSampler(self.train_ds, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                     shuffle=True, seed=self.cfg.seed + RECAL_SEED_OFFSET * (salt + 1))
        loader = DataLoader(self.train_ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=0)
        for images, _ in loader:
            yield self._to_device(images)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _recal_fn(self, salt: int):
        def recal(model: nn.Module, bns: list[nn.BatchNorm2d]) -> None:
            with _autocast(self.cfg, self.device):
                recalibrate_bn(model, self._recal_batches(salt), bns, self.cfg.dyrep_recal_bn_iters)
        return recal

    # ------------------------------------------------------------- resume
    def _load(self, ckpt: LoadedCheckpoint) -> None:
        state = ckpt.state
        self.model.load_state_dict(state["model"], strict=True)
        load_optimizer_state_by_name(self.optimizer, self.model, state["optimizer"])
        if self.dyrep is not None and "dyrep" in state:
            self.dyrep.load_state_dict(state["dyrep"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            restore_graph(self.ema.module, ckpt.graph)
            self.ema.module.load_state_dict(state["ema"], strict=True)
        set_rng_state(state["rng"])
        meta = ckpt.meta
        self.state = TrainState(epoch=int(meta["epoch"]), global_step=int(meta["global_step"]),
                                history=list(meta.get("history", [])), skipped_steps=int(meta.get("skipped_steps", 0)))
        logger.info("resumed from %s (epoch %d, %d blocks)", ckpt.path, self.state.epoch, count_blocks(self.model))

    def _checkpoint_writer(self, metrics: dict):
        # Snapshot now (tensors cloned to CPU) so later training cannot alter what is written.
        state = {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state_by_name(self.optimizer, self.model),
            "rng": rng_state(),
        }
        if self.dyrep is not None:
            state["dyrep"] = self.dyrep.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        meta = {"epoch": self.state.epoch, "global_step": self.state.global_step, "history": self.state.history,
                "metrics": metrics, "config": self.cfg.to_dict(), "skipped_steps": self.state.skipped_steps,
                "plain_params": self.plain_params, "num_classes": self.num_classes}
        graph = structure_graph(self.model)

        def write(path: Path) -> None:
            write_checkpoint_dir(path, state=state, meta=meta, graph=graph)
        return write

    # ---------------------------------------------------------------- epochs
    def fit(self) -> dict:
        cfg = self.cfg
        if self.ctx.is_main:
            self._write_run_files()
            logger.info("model %s: %d params, %.1f MFLOPs, %d DyRep-eligible convs; %d train / %d val images, "
                        "%d worker(s)", cfg.model, self.plain_params, self.plain_flops / 1e6,
                        len(self.dyrep.eligible_names) if self.dyrep else 0, *self._dataset_sizes(),
                        self.ctx.world_size)
        while self.state.epoch < cfg.epochs:
            self._run_epoch(self.state.epoch)
        return self.summary()

    def _is_adjust_epoch(self, epoch: int) -> bool:
        cfg = self.cfg
        return (self.dyrep is not None and (epoch + 1) % cfg.dyrep_adjust_interval == 0
                and epoch + 1 <= cfg.dyrep_max_adjust_epochs and epoch + 1 < cfg.epochs)

    def _run_epoch(self, epoch: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        record = self.dyrep is not None and epoch < cfg.dyrep_max_adjust_epochs
        train_loss, n_images, lr = self._train_one_epoch(epoch, record)
        train_time = time.perf_counter() - t0
        events, adjust_time = [], 0.0
        replica_digests = None
        if self._is_adjust_epoch(epoch):
            t_adj = time.perf_counter()
            events = self._adjust(epoch)
            adjust_time = time.perf_counter() - t_adj
            # Proof that every rank holds the same structure and weights after the change.
            replica_digests = ctx.gather_object(model_digest(self.model))
        if cfg.dyrep_recal_bn_every_epoch:
            self._recal_fn(salt=10_000 + epoch)(self.model, [m for m in self.model.modules()
                                                           if isinstance(m, nn.modules.batchnorm._BatchNorm)])
        val = self.evaluate(self.model)
        epoch_time = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1, "train_loss": train_loss, **val, "lr": lr,
            "params": count_params(self.model), "n_blocks": count_blocks(self.model),
            "epoch_time_s": round(epoch_time, 3), "train_time_s": round(train_time, 3),
            "adjust_time_s": round(adjust_time, 3), "images_per_s": round(n_images / max(train_time, 1e-9), 1),
            "skipped_steps": self.state.skipped_steps, "events": events,
        }
        if replica_digests is not None:
            metrics["replica_digests"] = replica_digests
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        self.state.epoch = epoch + 1
        self.state.history.append(metrics)
        last = self.state.epoch == cfg.epochs
        writer = self._checkpoint_writer(metrics) if (self.state.epoch % cfg.checkpoint_every == 0 or last) else None
        if ctx.is_main:
            self._write_run_files()
            logger.info("epoch %d/%d  loss %.4f  val_top1 %.2f  val_loss %.4f  lr %.5f  params %d  blocks %d  "
                        "%.1f img/s  %.1fs%s", epoch + 1, cfg.epochs, train_loss, val["val_top1"], val["val_loss"],
                        lr, metrics["params"], metrics["n_blocks"], metrics["images_per_s"], epoch_time,
                        "".join(f"  [{e['op']} {e['path']}]" for e in events))
        ctx.report(metrics, epoch + 1, writer)

    def _train_one_epoch(self, epoch: int, record: bool) -> tuple[float, int, float]:
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        steps = self._steps_per_epoch()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        n_images, lr = 0, self.schedule.lr_at(epoch)
        start_step = self.state.global_step
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.clip_grad if cfg.clip_grad is not None else math.inf
        for step, (images, targets) in enumerate(self._train_batches(epoch)):
            if self.shards is not None:
                self._recent_batches.append(images)
            if step == steps // 2:
                maybe_inject(epoch + 1, ctx.rank)
            lr = self.schedule.apply(self.optimizer, epoch + min(step / steps, 1.0))
            images, targets = self._to_device(images), targets.to(self.device, non_blocking=True)
            with _autocast(cfg, self.device):
                loss = F.cross_entropy(self.wrapped(images), targets, label_smoothing=cfg.smoothing)
            if poison_loss(epoch + 1, step):
                loss = loss * float("nan")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            # DDP has averaged gradients, so every rank sees the same norm and takes the same decision.
            # This is the loop's one host sync per step; on_nonfinite=ignore removes it.
            if cfg.clip_grad is not None or cfg.on_nonfinite != "ignore":
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if cfg.on_nonfinite != "ignore" and not bool(torch.isfinite(grad_norm)):
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(f"non-finite loss/gradient at epoch {epoch + 1} step {step}; "
                                             "lower the lr or set on_nonfinite=skip")
                self.state.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.update()
                continue
            if record:
                self.dyrep.record_metrics()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
            loss_sum += loss.detach()
            n_images += images.shape[0]
            self.state.global_step += 1
        done = self.state.global_step - start_step
        totals = ctx.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(done), device=self.device,
                                                                        dtype=torch.float64)]))
        return float(totals[0] / max(float(totals[1]), 1.0)), n_images * ctx.world_size, lr

    def _adjust(self, epoch: int) -> list[dict]:
        """All ranks: reduce metrics once, rank 0's plan broadcast, apply, re-wrap DDP, optimizer surgery."""
        plan = self.dyrep.plan()  # every rank joins the metric all-reduce inside
        plan = self.ctx.broadcast_object(plan)
        self.wrapped = None  # drop the old DDP (and its autograd hooks) before the structure changes
        recal_salt = self.dyrep.adjust_count
        events = [e.to_json() for e in self.dyrep.apply(plan, self.optimizer, self._recal_fn(recal_salt))]
        if self.ema is not None:
            apply_plan(self.ema.module, plan, self._recal_fn(recal_salt))
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.wrapped = self.ctx.wrap_model(self.model)  # DDP broadcasts rank 0's weights and buffers
        for note in plan.notes:
            logger.warning("DyRep: %s", note)
        if events and self.ctx.is_main:
            logger.info("after adjust: %d params, %.1f MFLOPs (plain model: %d params, %.1f MFLOPs)",
                        count_params(self.model), count_flops(self.model, (3, self.cfg.image_size,
                                                                          self.cfg.image_size)) / 1e6,
                        self.plain_params, self.plain_flops / 1e6)
        return events

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top1, top5, n
        for images, targets in self._val_batches():
            images, targets = self._to_device(images), targets.to(self.device)
            with _autocast(self.cfg, self.device):
                logits = model(images)
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, targets, reduction="sum")
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = topk.eq(targets[:, None])
            sums[1] += hit[:, :1].sum()
            sums[2] += hit.sum()
            sums[3] += targets.numel()
        sums = self.ctx.all_reduce_sum(sums)
        model.train(was_training)
        n = max(float(sums[3]), 1.0)
        return {"val_loss": float(sums[0]) / n, "val_top1": 100.0 * float(sums[1]) / n,
                "val_top5": 100.0 * float(sums[2]) / n}

    # ------------------------------------------------------------------ files
    def _write_run_files(self) -> None:
        """metrics.jsonl is rewritten from history, so a resumed run never duplicates epochs."""
        storage = self.ctx.storage
        storage.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.state.history))
        storage.write_text(STRUCTURE_FILE, json.dumps(structure_graph(self.model), indent=1))
        storage.write_text(CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True))

    def summary(self) -> dict:
        return summarize(self.state.history, self.plain_params)


def model_digest(model: nn.Module) -> str:
    """sha256 over the structure graph and every state tensor's bytes."""
    h = hashlib.sha256(json.dumps(structure_graph(model), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def summarize(history: list[dict], plain_params: int) -> dict:
    if not history:
        return {}
    events = [e for m in history for e in m.get("events", [])]
    return {
        "epochs": len(history),
        "best_top1": max(m["val_top1"] for m in history),
        "final_top1": history[-1]["val_top1"],
        "grows": sum(e["op"] == "grow" for e in events),
        "cuts": sum(e["op"] == "cut" for e in events),
        "max_train_params": max(m["params"] for m in history),
        "final_train_params": history[-1]["params"],
        "deployed_params": plain_params,
    }


def summary_line(summary: dict) -> str:
    if not summary:
        return "no epochs completed"
    return (f"best top-1 {summary['best_top1']:.2f}%, final top-1 {summary['final_top1']:.2f}% after "
            f"{summary['epochs']} epochs; {summary['grows']} grows, {summary['cuts']} cuts; params during training "
            f"{summary['final_train_params']:,} (max {summary['max_train_params']:,}) vs deployed "
            f"{summary['deployed_params']:,}")


def train(cfg: TrainConfig, ctx) -> dict:
    """Run (or resume) training described by ``cfg`` in ``ctx``; returns the summary dict."""
    return Trainer(cfg, ctx).fit()
