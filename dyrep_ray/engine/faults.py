"""Fault injection for resilience tests (off unless ``DYREP_RAY_FAULT`` is set).

``DYREP_RAY_FAULT="kill:epoch=2:rank=1:marker=/tmp/once"`` makes rank 1 SIGKILL its
own process half-way through epoch 2 (1-based), once: the marker file records
that the fault fired, so the restarted worker runs on.  ``raise`` instead of
``kill`` raises a RuntimeError.  Real process death, real Ray restart.
``sleep:epoch=3:seconds=60:marker=...`` stalls every rank mid-epoch once (a window
for a test to kill the driver).  ``nan:epoch=1:steps=2`` makes the loss of the first 2 steps of epoch 1 NaN on every rank.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

FAULT_ENV = "DYREP_RAY_FAULT"


def _parse(spec: str) -> tuple[str, dict]:
    kind, *fields = spec.split(":")
    return kind, dict(f.split("=", 1) for f in fields)


def maybe_inject(epoch: int, rank: int) -> None:
    """Called mid-epoch by the loop with the 1-based epoch number."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, fields = _parse(spec)
    if kind not in ("kill", "raise", "sleep"):
        return
    if int(fields.get("epoch", -1)) != epoch or (kind != "sleep" and int(fields.get("rank", 0)) != rank):
        return
    marker = Path(fields["marker"])
    if marker.exists():
        return
    if kind == "sleep":
        logger.warning("fault injection: sleeping %s s in epoch %d", fields.get("seconds", 60), epoch)
        time.sleep(float(fields.get("seconds", 60)))
        return
    marker.write_text(f"{kind} at epoch {epoch} rank {rank} pid {os.getpid()}\n")
    logger.warning("fault injection: %s at epoch %d on rank %d", kind, epoch, rank)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at epoch {epoch} on rank {rank}")


def poison_loss(epoch: int, step: int) -> bool:
    """True if the loss of (1-based ``epoch``, ``step``) should be replaced by NaN."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not spec.startswith("nan"):
        return False
    _, fields = _parse(spec)
    return int(fields.get("epoch", -1)) == epoch and step < int(fields.get("steps", 1))
