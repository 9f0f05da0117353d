"""GPU correctness checks: ``python -m bench.gpu_checks`` (one command, a few minutes on one GPU).

Each check runs a tiny real run of a path that only a GPU exercises fully and prints ONE line,
``PASS <check>: ...``, ``FAIL <check>: ...`` or ``SKIP <check>: <reason>``; the exit code is 1 when any check
failed.  Without a GPU (or with ``--device cpu``) every check that has a CPU form runs on the CPU (the test suite
runs it that way) and the CUDA-only ones say SKIP:

* ``lightning_device``: the Lightning callback on the device: a grow happens and DyRep's metric sums live on the
  gradients' device (Lightning moves the module there after the callback's setup);
* ``fp16_overflow``: ``amp: fp16`` with a forced GradScaler overflow: ``on_nonfinite: stop`` runs on (the step
  is skipped and counted), ``on_nonfinite: ignore`` still grows (the overflow adds nothing to the metric sums);
* ``bf16_true_recal``: Lightning ``precision="bf16-true"``: the grow's BN re-calibration runs and the new branch
  is bf16;
* ``tf32_agreement`` (CUDA only): synflow's grow ranking with TF32 on vs off (``dyrep_metric_fp32``) vs a float64
  reference on ResNet-18: PASS when the TF32-off grow decision (top-1) is float64's; the TF32-on agreement and
  the top-3 agreement of both are reported;
* ``ema_resume``: an EMA run resumed after a grow on the device ends with the uninterrupted run's structure and
  (within a tolerance: cuDNN is not bit-reproducible) weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = ["synthetic_train_size=48", "synthetic_val_size=16", "batch_size=16", "image_size=8",
        "dyrep_recal_bn_iters=1", "epochs=2"]
OVERFLOW_SCALE = 2.0 ** 40  # beyond fp16's range: every gradient of the next step overflows
RESUME_ATOL = {"cpu": 1e-6, "cuda": 1e-4}
TF32_BATCHES = 4
TF32_TOP = 3


@dataclass(frozen=True)
class Result:
    status: str  # PASS, FAIL or SKIP
    detail: str


def _run_local(device: torch.device, run_dir: Path, overrides: list[str], callbacks=()):
    from dyrep_ray.engine.config import load_config
    from dyrep_ray.engine.context import LocalContext
    from dyrep_ray.engine.loop import train

    cfg = load_config(None, list(overrides))
    return train(cfg, LocalContext(device, run_dir, cfg.keep_checkpoints), callbacks=callbacks)


def _metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- Lightning
def _lightning_fit(device: torch.device, image_size: int = 16, batch_size: int = 16, **trainer_args):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from dyrep_ray.data.synthetic import build_synthetic
    from dyrep_ray.integrations.lightning import DyRepCallback
    from dyrep_ray.models import build_model

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model("small_cnn", 10)

        def forward(self, images):
            return self.net(images)

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return F.cross_entropy(self(images).float(), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    train_ds, _, _ = build_synthetic(image_size=image_size, seed=0, train_size=2 * batch_size, val_size=8)
    callback = DyRepCallback(recal_bn_batches=2, seed=0)
    model = Classifier()
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, devices=1,
                         accelerator="gpu" if device.type == "cuda" else "cpu", **trainer_args)
    trainer.fit(model, DataLoader(train_ds, batch_size=batch_size))
    return model, callback


def check_lightning_device(device: torch.device, work: Path) -> Result:
    _, callback = _lightning_fit(device)
    grows = [e for e in callback.events if e["op"] == "grow"]
    sums = list(callback.dyrep._sums.values()) if callback.dyrep is not None else []
    where = {s.device.type for s in sums}
    ok = bool(grows) and where == {device.type} and all(bool(torch.isfinite(s)) for s in sums)
    return Result("PASS" if ok else "FAIL", f"{len(grows)} grow(s); metric sums on {sorted(where)}")


def check_bf16_true_recal(device: torch.device, work: Path) -> Result:
    from dyrep_ray.rep.blocks import is_block

    model, callback = _lightning_fit(device, image_size=8, batch_size=4, precision="bf16-true")
    blocks = [m for m in model.modules() if is_block(m)]
    dtypes = {p.dtype for b in blocks for p in b.parameters()}
    ok = bool(blocks) and dtypes == {torch.bfloat16}
    return Result("PASS" if ok else "FAIL",
                  f"{len(blocks)} grown block(s), parameter dtypes {sorted(map(str, dtypes))}")


# ------------------------------------------------------------------------------------------------- fp16
def _scale_at(scales: dict):
    from dyrep_ray.engine.callbacks import TrainerCallback

    class ScaleAt(TrainerCallback):
        def on_step_end(self, trainer, epoch, step, loss):
            if (epoch, step) in scales:
                trainer.scaler.update(new_scale=scales[epoch, step])

    return ScaleAt()


def check_fp16_overflow(device: torch.device, work: Path) -> Result:
    fp16 = [*TINY, "amp=fp16", "dyrep_metric=grad_norm"]
    one_overflow = {(0, 0): OVERFLOW_SCALE, (0, 1): 2.0 ** 8}  # step 1 of epoch 1 overflows, step 2 does not
    _run_local(device, work / "stop", [*fp16, "on_nonfinite=stop"], [_scale_at(one_overflow)])
    stop = _metrics(work / "stop")
    _run_local(device, work / "ignore", [*fp16, "on_nonfinite=ignore"], [_scale_at(one_overflow)])
    ignore = _metrics(work / "ignore")
    stop_ok = len(stop) == 2 and stop[0]["skipped_steps"] == 1
    ignore_ok = any(e["op"] == "grow" for e in ignore[0]["events"])
    return Result("PASS" if stop_ok and ignore_ok else "FAIL",
                  f"stop: {len(stop)} epochs, {stop[0]['skipped_steps']} skipped step(s); ignore: "
                  f"{sum(e['op'] == 'grow' for e in ignore[0]['events'])} grow(s) after the overflow")


# ------------------------------------------------------------------------------------------------- TF32
def _synflow_scores(model, batches, dtype: torch.dtype) -> dict[str, float]:
    from dyrep_ray.rep import DyRep

    model = model.to(dtype)
    dyrep = DyRep(model, metric="synflow")
    for images, targets in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images.to(dtype)), targets).backward()
        dyrep.record_metrics()
    return dyrep.metric_scores()


def _top(scores: dict[str, float]) -> list[str]:
    return [n for n, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:TF32_TOP]]


def check_tf32_agreement(device: torch.device, work: Path) -> Result:
    if device.type != "cuda":
        return Result("SKIP", "TF32 exists only on CUDA (the switch itself: tests/test_precision.py)")
    import copy

    from dyrep_ray.engine.precision import full_fp32
    from dyrep_ray.models import build_model

    torch.manual_seed(0)
    base = build_model("resnet18", 100).to(device).train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=gen).to(device), torch.randint(0, 100, (32,), generator=gen)
                .to(device)) for _ in range(TF32_BATCHES)]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with_tf32 = _synflow_scores(copy.deepcopy(base), batches, torch.float32)
        with full_fp32(True):
            without = _synflow_scores(copy.deepcopy(base), batches, torch.float32)
            reference = _synflow_scores(copy.deepcopy(base), batches, torch.float64)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    ref_top = _top(reference)
    ok = _top(without)[:1] == ref_top[:1]  # the grow decision of dyrep_grow_topk=1
    return Result("PASS" if ok else "FAIL",
                  f"grow decision (top-1) vs float64: TF32 off {'agrees' if ok else 'differs'}, TF32 on "
                  f"{'agrees' if _top(with_tf32)[:1] == ref_top[:1] else 'differs'}; top-{TF32_TOP}: TF32 off "
                  f"{'agrees' if _top(without) == ref_top else 'differs'}, TF32 on "
                  f"{'agrees' if _top(with_tf32) == ref_top else 'differs'} ({len(reference)} convs)")


# -------------------------------------------------------------------------------------------------- EMA
def check_ema_resume(device: torch.device, work: Path) -> Result:
    from dyrep_ray.engine.callbacks import TrainerCallback
    from dyrep_ray.engine.checkpoint import find_valid_checkpoints, load_checkpoint_dir

    overrides = [*TINY, "model_ema=true", "model_ema_decay=0.9", "keep_checkpoints=5"]
    ref, snapshot = work / "ref", work / "after_grow"

    class Snapshot(TrainerCallback):
        def on_checkpoint(self, trainer, epoch):
            if epoch == 0:  # after epoch 1's grow: what a run killed here leaves behind
                shutil.copytree(ref, snapshot)

    deterministic = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        _run_local(device, ref, overrides, [Snapshot()])
        _run_local(device, snapshot, overrides)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic
    a, b = (load_checkpoint_dir(find_valid_checkpoints(d)[0]) for d in (ref, snapshot))
    grown = any(e["op"] == "grow" for e in _metrics(ref)[0]["events"])
    worst = max(float((a.state["ema"][k].double() - b.state["ema"][k].double()).abs().max())
                for k in a.state["ema"] if a.state["ema"][k].numel())
    tolerance = RESUME_ATOL.get(device.type, RESUME_ATOL["cuda"])
    ok = grown and a.graph == b.graph and worst <= tolerance
    return Result("PASS" if ok else "FAIL", f"grown before the resume: {grown}; same structure: {a.graph == b.graph}; "
                                            f"EMA max |diff| {worst:.2e} (tolerance {tolerance:g})")


CHECKS: dict[str, Callable[[torch.device, Path], Result]] = {
    "lightning_device": check_lightning_device,
    "fp16_overflow": check_fp16_overflow,
    "bf16_true_recal": check_bf16_true_recal,
    "tf32_agreement": check_tf32_agreement,
    "ema_resume": check_ema_resume,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available, else the CPU forms of the checks")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (or auto)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown check(s) {unknown}; choose from {list(CHECKS)}", file=sys.stderr)
        return 2
    import logging

    logging.disable(logging.WARNING)  # one line per check; a failing check prints its traceback below its line
    failed = False
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dyrep-gpu-checks-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            try:
                result = CHECKS[name](device, work)
            except Exception as exc:  # a crash is this check's FAIL; the others still run
                result = Result("FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(file=sys.stderr)
            failed |= result.status == "FAIL"
            print(f"{result.status} {name}: {result.detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
