"""Benchmark 5: cost of one structure adjustment, in training steps.

The real code path, ``engine.loop.Trainer._adjust`` (metric all-reduce + plan, broadcast, grow with
BN recalibration on ``dyrep_recal_bn_iters`` = 20 batches from the training loader, optimizer
surgery, DDP re-wrap), on VGG-16-CIFAR, single process: a gloo process group of world size 1 and a
context whose ``wrap_model`` builds ``DistributedDataParallel`` -- so the re-wrap is a real DDP
construction (parameter/buffer broadcast, reducer buckets).
"""

from __future__ import annotations

import math
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import Trainer

from .common import interleaved_ratios, single_process_group


class DDPLocalContext(LocalContext):
    """LocalContext whose model wrapping and collectives go through a (world size 1) process group."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrap_seconds: list[float] = []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        t0 = time.perf_counter()
        ids = None
        if self.device.type == "cuda":
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        wrapped = DistributedDataParallel(model, device_ids=ids)
        self.wrap_seconds.append(time.perf_counter() - t0)
        return wrapped

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor


def _step(trainer: Trainer, images, targets):
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step():
        loss = F.cross_entropy(trainer.wrapped(images), targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
        if not bool(torch.isfinite(grad_norm)):
            raise RuntimeError("non-finite gradient in benchmark")
        trainer.dyrep.record_metrics()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step


def run(device: torch.device, quick: bool = False, batch: int | None = None, reps: int | None = None,
        model: str = "vgg16_cifar", recal_iters: int = 20) -> dict:
    batch = batch or (128 if device.type == "cuda" else (16 if quick else 32))
    reps = reps or (4 if quick else 8)
    overrides = [f"model={model}", "dataset=synthetic", f"batch_size={batch}",
                 f"synthetic_train_size={batch * (recal_iters + 2)}", "synthetic_val_size=64",
                 f"dyrep_recal_bn_iters={recal_iters}", "dyrep_grow_topk=1", "epochs=2", "num_data_workers=0"]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory(prefix="dyrep-bench-adjust-") as tmp, single_process_group(device):
        ctx = DDPLocalContext(device, f"{tmp}/run")
        trainer = Trainer.from_config(cfg, ctx)
        trainer.model.train()
        images, targets = next(iter(trainer.data.train_batches(0)))
        images, targets = trainer._to_device(images), targets.to(device)
        step = _step(trainer, images, targets)
        timing = interleaved_ratios({"step": step}, reps=reps, warmup=2, device=device)
        step_s = timing["step"]["median_s"]
        # time the pieces of the adjust by wrapping them (same code path as training)
        pieces: dict[str, float] = {}
        recal_factory = trainer._recal_fn

        def timed_recal_fn(salt):
            inner = recal_factory(salt)

            def recal(model, bns):
                t0 = time.perf_counter()
                inner(model, bns)
                pieces["recal_s"] = pieces.get("recal_s", 0.0) + time.perf_counter() - t0
            return recal

        trainer._recal_fn = timed_recal_fn
        wraps_before = len(ctx.wrap_seconds)
        t0 = time.perf_counter()
        events = trainer._adjust(epoch=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        adjust_s = time.perf_counter() - t0
        pieces["ddp_rewrap_s"] = sum(ctx.wrap_seconds[wraps_before:])
        pieces["plan_apply_surgery_other_s"] = adjust_s - pieces.get("recal_s", 0.0) - pieces["ddp_rewrap_s"]
        after = interleaved_ratios({"step": _step(trainer, images, targets)}, reps=max(2, reps // 2), warmup=1,
                                   device=device)
    steps_equiv = adjust_s / step_s
    return {
        "model": model, "batch": batch, "recal_batches": recal_iters, "reps": reps,
        "events": [{k: e[k] for k in ("op", "path")} for e in events],
        "adjust_s": adjust_s, **pieces,
        "step_s_before": step_s, "step_s_after": after["step"]["median_s"],
        "adjust_in_steps": steps_equiv, "goal": 30, "met": steps_equiv <= 30,
    }
