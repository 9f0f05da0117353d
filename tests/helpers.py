"""Helpers shared by the tests: tolerances, tiny run configs, run-file readers, state comparisons, BN randomizing."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from dyrep_ray.engine.checkpoint import find_valid_checkpoints, load_checkpoint_dir
from dyrep_ray.export.weights import rebuild_trained_model
from dyrep_ray.rundir.layout import METRICS_FILE

#: Largest weight difference accepted between a resumed run and the uninterrupted one (CPU, same world size).
RESUME_ATOL = 1e-6

#: A --local run in seconds: tiny synthetic data, 3 epochs, DyRep grows 2 convs after epochs 1 and 2.
LOCAL_TINY = ["synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
              "epochs=3", "dyrep_grow_topk=2"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (shapes must match)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def final_model(run_dir):
    """(trained model rebuilt from the newest valid checkpoint of ``run_dir``, that checkpoint)."""
    ckpt = load_checkpoint_dir(find_valid_checkpoints(run_dir)[0])
    return rebuild_trained_model(ckpt)[0], ckpt


def run_metrics(run_dir: Path) -> list[dict]:
    """The epoch records of ``run_dir/metrics.jsonl``, read as plain JSON lines."""
    return [json.loads(x) for x in (Path(run_dir) / METRICS_FILE).read_text().splitlines() if x.strip()]


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest elementwise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def run_local(run_dir, overrides: Sequence[str], callbacks: Iterable = ()):
    """(config, summary) of a ``--local`` run of the built-in config with ``overrides`` in ``run_dir``."""
    from dyrep_ray.engine.config import load_config
    from dyrep_ray.engine.context import LocalContext
    from dyrep_ray.engine.loop import train

    cfg = load_config(None, list(overrides))
    return cfg, train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints), callbacks=callbacks)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
