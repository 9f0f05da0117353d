"""The GPU suite: ``python -m bench --gpu`` (one command, well under 10 minutes on one GPU, writes JSON).

Measured side by side in one process, variants alternated round by round:

* training images/s of plain timm ResNet-50 vs the same model with the same 3x3 convs grown into DyRep blocks
  (``bn`` = the paper's DiverseBranchBlock, ``online`` = online re-parameterization, OREPA-style), with bf16
  autocast + channels_last, eager and ``torch.compile``;
* what an adjust costs a compiled model: the model is compiled once, one more conv grows, and the model is
  compiled again (the only recompile a DyRep run needs: structure changes happen at adjust points only);
* DDP overhead: the same step under a 1-GPU DistributedDataParallel (NCCL) vs bare;
* the Trainer's own step (:meth:`~dyrep_ray.engine.loop.Trainer.train_step`, the code path training runs: LR,
  autocast, the non-finite check, optimizer, EMA off) of the plain model and of the grown (online) model, next to
  a bare step of the plain model with the same optimizer: img/s and the ratio (what the Trainer adds on top of
  the blocks).

``--dry-run`` runs every code path on CPU in seconds (tiny batch and images, two timed rounds, the
``eager`` dynamo backend instead of inductor): the test suite runs it so the suite is known to work before a
GPU is ever lent.  Numbers from a dry run mean nothing.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dyrep_ray.engine.assembly import build_optimizer, build_run
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.models import build_model
from dyrep_ray.rep.grow_cut import grow_conv
from dyrep_ray.rep.online import grow_online_block
from dyrep_ray.rep.paths import eligible_convs, get_submodule, set_submodule

from .common import interleaved_ratios, machine_info, single_process_group, synchronize

NUM_CLASSES = 1000
INIT_GAMMA = 0.01


@dataclass(frozen=True)
class SuiteSize:
    model: str
    # The convs grown in every "grown" variant, and the one grown at the simulated adjust of a compiled model.
    grown_paths: tuple[str, ...]
    adjust_path: str
    batch: int
    image_size: int
    reps: int
    warmup: int
    compile_backend: str


# The 3x3 conv of the first bottleneck of each stage: a DyRep run on ImageNet grows one conv per adjust, and 4
# blocks is what ~20 epochs of the paper's schedule produce.
FIRST_BOTTLENECK_CONVS = ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2")
FULL = SuiteSize(model="timm/resnet50", grown_paths=FIRST_BOTTLENECK_CONVS, adjust_path="layer3.1.conv2", batch=128,
                 image_size=224, reps=12, warmup=3, compile_backend="inductor")
# ResNet-14-T has ResNet-50's bottleneck blocks, one per stage: the same code paths in seconds.
DRY_RUN = SuiteSize(model="timm/resnet14t", grown_paths=FIRST_BOTTLENECK_CONVS[:3],
                    adjust_path=FIRST_BOTTLENECK_CONVS[3],
                    batch=2, image_size=32, reps=2, warmup=1, compile_backend="eager")
# Every block instance of another shape is one more dynamo cache entry of the same forward code; the default
# limit (8) would silently fall back to eager for the later blocks of a grown ResNet-50.
RECOMPILE_LIMIT = 64


def grow_with_bn_blocks(model: nn.Module, paths: tuple[str, ...], seed: int = 0) -> nn.Module:
    for i, path in enumerate(paths):
        grow_conv(model, path, seed=seed + i, init_gamma=INIT_GAMMA)
    return model


def grow_with_online_blocks(model: nn.Module, paths: tuple[str, ...], seed: int = 0) -> nn.Module:
    for i, path in enumerate(paths):
        set_submodule(model, path, grow_online_block(get_submodule(model, path), seed=seed + i, init_gamma=INIT_GAMMA))
    return model


# Block type -> function growing ``paths`` of a model in place with that block type.
BLOCK_GROWERS: dict[str, Callable[[nn.Module, tuple[str, ...]], nn.Module]] = {
    "bn": grow_with_bn_blocks, "online": grow_with_online_blocks}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
               device: torch.device) -> Callable[[], None]:
    amp_dtype = torch.bfloat16

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=amp_dtype):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _prepared(model: nn.Module, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = model.to(device, memory_format=torch.channels_last).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _first_step_seconds(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - t0


def run(device: torch.device, dry_run: bool = False) -> dict:
    size = DRY_RUN if dry_run else FULL
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch.manual_seed(0)
    images = torch.randn(size.batch, 3, size.image_size, size.image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    targets = torch.randint(0, NUM_CLASSES, (size.batch,), device=device)
    base = build_model(size.model, NUM_CLASSES)
    eligible = {name for name, _ in eligible_convs(base)}
    missing = [p for p in (*size.grown_paths, size.adjust_path) if p not in eligible]
    if missing:
        raise RuntimeError(f"{size.model} has no eligible conv(s) {missing}: the suite's conv paths need updating")

    growers = BLOCK_GROWERS
    variants: dict[str, nn.Module] = {"plain": copy.deepcopy(base)}
    for block_type, grow in growers.items():
        variants[f"grown_{block_type}"] = grow(copy.deepcopy(base), size.grown_paths)

    result: dict = {"machine": machine_info(device), "model": size.model, "batch": size.batch,
                    "image_size": size.image_size, "dry_run": dry_run, "amp": "bf16", "channels_last": True,
                    "grown_paths": list(size.grown_paths), "adjust_path": size.adjust_path,
                    "block_types": list(growers)}

    # 1. eager images/s, every variant alternated
    steps = {}
    for name, model in variants.items():
        model, optimizer = _prepared(model, device)
        variants[name] = model
        steps[name] = train_step(model, optimizer, images, targets, device)
    eager = interleaved_ratios(steps, reps=size.reps, warmup=size.warmup, device=device, baseline="plain")
    result["eager"] = {n: {"images_per_s": size.batch / r["median_s"], "step_over_plain": r["ratio"]}
                       for n, r in eager.items()}

    # 2. torch.compile: compile time, then images/s, alternated
    compiled_steps, compile_s = {}, {}
    for name, model in variants.items():
        compiled = torch.compile(model, backend=size.compile_backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        compiled_steps[name] = train_step(compiled, optimizer, images, targets, device)
        compile_s[name] = _first_step_seconds(compiled_steps[name], device)
    timed = interleaved_ratios(compiled_steps, reps=size.reps, warmup=size.warmup, device=device, baseline="plain")
    result["compiled"] = {n: {"images_per_s": size.batch / r["median_s"], "step_over_plain": r["ratio"],
                              "first_step_s": compile_s[n],
                              "speedup_over_eager": eager[n]["median_s"] / r["median_s"]}
                          for n, r in timed.items()}

    # 3. an adjust under torch.compile: grow one more conv, compile again (once), compare first-step times
    adjust = {}
    for block_type, grow in growers.items():
        model = variants[f"grown_{block_type}"]
        grow(model, (size.adjust_path,))
        model, optimizer = _prepared(model, device)
        recompiled = train_step(torch.compile(model, backend=size.compile_backend), optimizer, images, targets,
                                device)
        first = _first_step_seconds(recompiled, device)
        second = _first_step_seconds(recompiled, device)
        adjust[block_type] = {"recompile_first_step_s": first, "next_step_s": second,
                              "initial_compile_first_step_s": compile_s[f"grown_{block_type}"]}
    result["adjust_recompile"] = adjust

    # 4. DDP overhead on one device (NCCL on GPU, gloo on CPU for the dry run)
    with single_process_group(device):
        plain, _ = _prepared(copy.deepcopy(base), device)
        ddp_model = copy.deepcopy(plain)
        device_ids = [device.index or 0] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=device_ids)
        pair = {"bare": train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.01), images, targets, device),
                "ddp": train_step(ddp, torch.optim.SGD(ddp.parameters(), lr=0.01), images, targets, device)}
        ddp_times = interleaved_ratios(pair, reps=size.reps, warmup=size.warmup, device=device, baseline="bare")
    result["ddp"] = {"backend": "nccl" if device.type == "cuda" else "gloo",
                     "ddp_over_bare": ddp_times["ddp"]["ratio"],
                     "images_per_s": {n: size.batch / r["median_s"] for n, r in ddp_times.items()}}

    # 5. the Trainer's real step vs a bare step
    result["trainer_step"] = trainer_step_section(size, device, images, targets)
    return result


def trainer_step_section(size: SuiteSize, device: torch.device, images: torch.Tensor,
                         targets: torch.Tensor) -> dict:
    """Trainer.train_step of the plain and the online-grown model vs a bare plain step, alternated."""
    overrides = [f"model={size.model}", f"num_classes={NUM_CLASSES}", f"image_size={size.image_size}",
                 f"batch_size={size.batch}", f"synthetic_train_size={size.batch}",
                 f"synthetic_val_size={size.batch}", "amp=bf16", "channels_last=true", "dyrep=false", "epochs=1"]
    cfg = load_config(None, overrides)
    steps: dict[str, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = LocalContext(device, run_dir, 1)
        trainers = {}
        for name, grown in (("trainer_plain", ()), ("trainer_online", size.grown_paths)):
            parts = build_run(cfg, ctx)
            if grown:  # grown before the optimizer is built, as after an adjust's optimizer surgery
                grow_with_online_blocks(parts.model, grown)
                parts.model.to(device, memory_format=torch.channels_last if parts.channels_last
                               else torch.preserve_format)
                parts.optimizer = build_optimizer(cfg, parts.model)
            trainers[name] = Trainer(parts, ctx)
            trainers[name].model.train()
        bare = trainers["trainer_plain"].model
        bare_model, _ = _prepared(copy.deepcopy(bare), device)
        steps["bare_plain"] = train_step(bare_model, build_optimizer(cfg, bare_model), images, targets, device)
        for name, trainer in trainers.items():
            steps[name] = (lambda t=trainer: t.train_step(images, targets, epoch=0, step=0))  # type: ignore[misc]
        timed = interleaved_ratios(steps, reps=size.reps, warmup=size.warmup, device=device, baseline="bare_plain")
    return {n: {"images_per_s": size.batch / r["median_s"], "step_over_bare_plain": r["ratio"]}
            for n, r in timed.items()}


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of one run."""
    lines = [f"{result['model']}, batch {result['batch']}, {result['image_size']}², bf16 autocast, channels_last"
             f"{' — DRY RUN on CPU, numbers meaningless' if result['dry_run'] else ''}", "",
             "| model | eager img/s | eager vs plain | compiled img/s | compiled vs plain | compile 1st step |",
             "|---|---|---|---|---|---|"]
    for name, e in result["eager"].items():
        c = result["compiled"][name]
        lines.append(f"| {name} | {e['images_per_s']:.0f} | {e['step_over_plain']:.2f}x step | "
                     f"{c['images_per_s']:.0f} | {c['step_over_plain']:.2f}x step | {c['first_step_s']:.1f} s |")
    for block_type, a in result["adjust_recompile"].items():
        lines.append(f"\nadjust under torch.compile ({block_type} blocks): first step after regrow "
                     f"{a['recompile_first_step_s']:.1f} s (initial compile {a['initial_compile_first_step_s']:.1f} s),"
                     f" next step {a['next_step_s'] * 1e3:.0f} ms")
    d = result["ddp"]
    lines.append(f"\n1-device DDP ({d['backend']}) step time / bare: {d['ddp_over_bare']:.3f}x")
    lines += ["", "| Trainer step | img/s | step vs bare plain |", "|---|---|---|"]
    for name, t in result["trainer_step"].items():
        lines.append(f"| {name} | {t['images_per_s']:.0f} | {t['step_over_bare_plain']:.2f}x |")
    return "\n".join(lines)
