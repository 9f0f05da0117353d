"""Benchmark 1: DyRep bookkeeping per training step (VGG-16-CIFAR, no block grown yet).

Step time with ``DyRep.record_metrics`` on / off (interleaved, paired per round) and the host
synchronizations and collectives issued by ``record_metrics`` (goal: 0 and 0 per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dyrep_ray.models import build_model
from dyrep_ray.rep import DyRep

from .common import interleaved_ratios, single_process_group
from .sync_counter import SyncCounter


def make_step(model, optimizer, images, targets, dyrep: DyRep | None):
    """One step exactly as ``engine.loop.Trainer._train_one_epoch`` does it (no AMP)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
        if not bool(torch.isfinite(grad_norm)):  # the loop's own per-step check (not DyRep's)
            raise RuntimeError("non-finite gradient in benchmark")
        if dyrep is not None:
            dyrep.record_metrics()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def count_record_metrics_syncs(dyrep: DyRep, model, optimizer, images, targets, steps: int = 3) -> dict:
    """Syncs/collectives inside ``record_metrics`` over ``steps`` real steps, with a process group up
    (so code that calls collectives only when one exists would show here)."""
    per_step = []
    for _ in range(steps):
        F.cross_entropy(model(images), targets).backward()
        with SyncCounter() as counter:
            dyrep.record_metrics()
        per_step.append((counter.syncs, counter.collectives, counter.details()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with SyncCounter() as decision:
        dyrep.metric_scores()
    return {"syncs_per_step": max(s for s, _, _ in per_step),
            "collectives_per_step": max(c for _, c, _ in per_step),
            "details_last_step": per_step[-1][2],
            "decision_time_syncs": decision.syncs, "decision_time_collectives": decision.collectives}


def run(device: torch.device, quick: bool = False, batch: int | None = None, reps: int | None = None,
        model_name: str = "vgg16_cifar", image_size: int = 32) -> dict:
    batch = batch or (32 if device.type == "cuda" else 8)
    reps = reps or (6 if quick else 15)
    torch.manual_seed(0)
    models, steps, dyreps = {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    targets = torch.randint(0, 10, (batch,), generator=gen).to(device)
    for variant in ("dyrep_off", "dyrep_on"):
        torch.manual_seed(0)
        model = build_model(model_name, 10).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        dyrep = DyRep(model) if variant == "dyrep_on" else None
        models[variant], dyreps[variant] = (model, optimizer), dyrep
        steps[variant] = make_step(model, optimizer, images, targets, dyrep)
    timing = interleaved_ratios(steps, reps=reps, warmup=2, device=device, baseline="dyrep_off")
    model, optimizer = models["dyrep_on"]
    with single_process_group(device):
        counts = count_record_metrics_syncs(dyreps["dyrep_on"], model, optimizer, images, targets)
    # record_metrics alone (after a backward, grads present), for scale
    F.cross_entropy(model(images), targets).backward()
    alone = interleaved_ratios({"record_metrics": dyreps["dyrep_on"].record_metrics}, reps=max(reps, 10),
                               warmup=2, device=device)
    optimizer.zero_grad(set_to_none=True)
    ratio = timing["dyrep_on"]["ratio"]
    return {
        "model": model_name, "batch": batch, "reps": reps,
        "eligible_convs": len(dyreps["dyrep_on"].eligible_names),
        "step_s_off": timing["dyrep_off"]["median_s"], "step_s_on": timing["dyrep_on"]["median_s"],
        "ratio_on_off": ratio, "cpu_ratio_on_off": timing["dyrep_on"]["cpu_ratio"],
        "record_metrics_s": alone["record_metrics"]["median_s"],
        **counts,
        "met": counts["syncs_per_step"] == 0 and counts["collectives_per_step"] == 0,
    }
