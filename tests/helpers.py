"""Small assertions shared by the maths tests."""

from __future__ import annotations

import torch

from dyrep_ray.engine.checkpoint import find_valid_checkpoints, load_checkpoint_dir
from dyrep_ray.export.convert import rebuild_trained_model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (shapes must match)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def final_model(run_dir):
    """(trained model rebuilt from the newest valid checkpoint of ``run_dir``, that checkpoint)."""
    ckpt = load_checkpoint_dir(find_valid_checkpoints(run_dir)[0])
    return rebuild_trained_model(ckpt)[0], ckpt
