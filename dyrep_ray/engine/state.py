"""Where a run stands: what a checkpoint records and a resume restores (torch-free, so callbacks can name it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    history: list = field(default_factory=list)
    skipped_steps: int = 0
