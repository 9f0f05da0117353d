"""Benchmarks 3 and 4 on ResNet-18 at CIFAR size (32x32 input).

3. Training step time averaged over a DyRep-like schedule (plain -> 4 grows chosen by DyRep's
   synflow metric -> cuts of weak branches) vs the same model with every 3x3 conv a DBB, and vs plain.
4. The schedule's final model deployed (every block folded): parameter count vs the plain model,
   eval latency deployed / plain (interleaved), and the output difference.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.models import build_model, count_params
from dyrep_ray.rep import DyRep
from dyrep_ray.rep.blocks import is_block
from dyrep_ray.rep.deploy import deploy
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.paths import eligible_convs, iter_blocks

from .common import interleaved_ratios

MODEL = "resnet18"
STEM = "conv1"  # the 7x7 stem: not a 3x3 conv, excluded from every variant


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _train_steps(model, images, targets, steps: int, dyrep: DyRep | None = None) -> None:
    optimizer = _optimizer(model)
    model.train()
    for _ in range(steps):
        F.cross_entropy(model(images), targets).backward()
        if dyrep is not None:
            dyrep.record_metrics()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def build_schedule(images, targets, grows: int = 4, cut_blocks: int = 2, cut_per_block: int = 3,
                   steps_per_stage: int = 2) -> list[tuple[str, nn.Module]]:
    """Snapshots of one DyRep-like run: plain, after each grow (top-1 synflow, a few steps of
    training between adjusts), and after cutting the ``cut_per_block`` least important branches of
    the first ``cut_blocks`` blocks (DyRep's cut rule keeps kxk; the function is preserved)."""
    torch.manual_seed(0)
    model = build_model(MODEL, 10).to(images.device)
    dyrep = DyRep(model, exclude=(STEM,), grow_topk=1, max_depth=1)
    stages = [("plain", copy.deepcopy(model))]
    for i in range(grows):
        _train_steps(model, images, targets, steps_per_stage, dyrep)
        plan = dyrep.plan()
        plan = dataclasses.replace(plan, cut=())  # cuts come once, below, so the stages are comparable across runs
        dyrep.apply(plan)
        stages.append((f"grow{i + 1}", copy.deepcopy(model)))
    _train_steps(model, images, targets, steps_per_stage, dyrep)
    blocks = iter_blocks(model)[:cut_blocks]
    for path, block in blocks:
        importance = {n: float(v) for n, v in block.branch_importance().items() if n != "kxk"}
        weakest = sorted(importance, key=importance.get)[:cut_per_block]
        dyrep.cut(path, weakest)
    stages.append(("grow4+cut", copy.deepcopy(model)))
    return stages


def all_dbb_model(device) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(MODEL, 10).to(device)
    for i, (path, conv) in enumerate(eligible_convs(model, max_depth=1, exclude=(STEM,))):
        if conv.kernel_size == (3, 3):
            grow_conv(model, path, seed=i)
    return model


def _step_fn(model, images, targets):
    optimizer = _optimizer(model)
    model.train()

    def step():
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def describe(model: nn.Module) -> dict:
    blocks = iter_blocks(model)
    return {"blocks": len(blocks), "branches": sum(len(b.branch_names) for _, b in blocks),
            "params": count_params(model)}


def run(device: torch.device, quick: bool = False, batch: int | None = None, reps: int | None = None) -> dict:
    batch = batch or (128 if device.type == "cuda" else (16 if quick else 32))
    reps = reps or (3 if quick else 6)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    targets = torch.randint(0, 10, (batch,), generator=gen).to(device)
    stages = build_schedule(images, targets)
    plain = stages[0][1]
    dbb_all = all_dbb_model(device)
    models = {"plain": plain, "all_dbb": dbb_all, **{name: m for name, m in stages[1:]}}
    steps = {name: _step_fn(m, images, targets) for name, m in models.items()}
    timing = interleaved_ratios(steps, reps=reps, warmup=1, device=device, baseline="all_dbb")
    stage_names = [name for name, _ in stages]
    schedule_mean = statistics.mean(timing[n]["median_s"] for n in stage_names)
    schedule_ratio = statistics.mean(timing[n]["ratio"] for n in stage_names)
    schedule_cpu_ratio = statistics.mean(timing[n]["cpu_ratio"] for n in stage_names)
    result3 = {
        "model": MODEL, "input": "32x32", "batch": batch, "reps": reps,
        "stages": {n: {**describe(models[n]), "step_s": timing[n]["median_s"], "over_all_dbb": timing[n]["ratio"]}
                   for n in stage_names},
        "all_dbb": {**describe(dbb_all), "step_s": timing["all_dbb"]["median_s"]},
        "plain_step_s": timing["plain"]["median_s"],
        "schedule_mean_step_s": schedule_mean,
        "schedule_over_all_dbb": schedule_ratio, "schedule_over_all_dbb_cpu": schedule_cpu_ratio,
        "all_dbb_over_plain": 1.0 / timing["plain"]["ratio"],
        "schedule_over_plain": schedule_ratio / timing["plain"]["ratio"],
        "goal": 0.6, "met": schedule_ratio <= 0.6,
    }
    result4 = deploy_latency(stages[-1][1], plain, device, quick=quick)
    return {"schedule": result3, "deploy": result4}


def deploy_latency(trained: nn.Module, plain_reference: nn.Module, device, quick: bool = False,
                   batch: int | None = None, reps: int | None = None, model_name: str = MODEL,
                   image_size: int = 32) -> dict:
    batch = batch or (128 if device.type == "cuda" else 32)
    reps = reps or (8 if quick else 20)
    trained = copy.deepcopy(trained).eval()
    deployed = deploy(trained).eval()
    plain = copy.deepcopy(plain_reference).eval()
    plain.load_state_dict(deployed.state_dict(), strict=True)  # the untouched architecture, same weights
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = trained(x)
        diff = float((deployed(x) - ref).abs().max())
        scale = float(ref.abs().max())
        timing = interleaved_ratios({"plain": lambda: plain(x), "deployed": lambda: deployed(x)}, reps=reps,
                                    warmup=2, device=device, baseline="plain")
    ratio = timing["deployed"]["ratio"]
    params_plain, params_deployed = count_params(plain_reference), count_params(deployed)
    return {
        "model": model_name, "batch": batch, "reps": reps, "blocks_folded": len(iter_blocks(trained)),
        "params_trained": count_params(trained), "params_deployed": params_deployed, "params_plain": params_plain,
        "params_equal": params_plain == params_deployed,
        "max_abs_output_diff": diff, "max_abs_output": scale,
        "latency_s_plain": timing["plain"]["median_s"], "latency_s_deployed": timing["deployed"]["median_s"],
        "latency_ratio": ratio, "latency_cpu_ratio": timing["deployed"]["cpu_ratio"],
        "goal": "params equal, ratio 1.00 +- 0.03",
        "met": params_plain == params_deployed and abs(ratio - 1.0) <= 0.03,
        "no_blocks_left": not any(is_block(m) for m in deployed.modules()),
    }
