"""TF32 and the DyRep metric: the warning at start and the full-fp32 switch of ``dyrep_metric_fp32``.

TF32 (on by default for cuDNN convolutions on Ampere and later GPUs) keeps 10 mantissa bits in the convolutions
that produce the gradients.  ``synflow`` and ``snip`` sum grad x weight products that cancel to eps scale, the
same reason they are refused under AMP, so with TF32 on the convs they grow may differ from a float32 run.
``dyrep_metric_fp32: true`` turns TF32 off for the training steps of every epoch that records the metric (the
gradients come from those forward/backward passes, so switching it off around the accumulation alone would
change nothing) and restores the user's settings afterwards: epochs after ``dyrep_max_adjust_epochs`` and
evaluation keep TF32's speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config_values import AMP_UNSAFE_METRICS


def tf32_enabled() -> list[str]:
    """The torch back ends that compute float32 convolutions/matmuls in TF32 right now."""
    flags = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    return [name for name, on in flags.items() if on]


def tf32_metric_warning(cfg, device_type: str) -> str | None:
    """One line for the run's start when TF32 may change which convs grow (None when it cannot)."""
    if (device_type != "cuda" or not cfg.dyrep or cfg.dyrep_metric not in AMP_UNSAFE_METRICS
            or cfg.dyrep_metric_fp32 or cfg.amp != "none"):
        return None
    on = tf32_enabled()
    if not on:
        return None
    return (f"TF32 is on ({', '.join(on)}): dyrep_metric {cfg.dyrep_metric} sums eps-scale products, so the convs "
            "it grows may differ from a float32 run; set dyrep_metric_fp32=true to record it in full fp32")


@contextmanager
def full_fp32(enabled: bool) -> Iterator[None]:
    """TF32 off for cuDNN and matmul inside the block when ``enabled``; the previous flags restored after it."""
    if not enabled:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
