"""Learning-rate schedules (cosine / step / constant) with linear warmup.

The LR is a pure function of the (fractional) epoch, so a resumed run needs no
scheduler state and a structure change cannot move the schedule.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer


class LRSchedule:
    def __init__(self, *, base_lr: float, epochs: int, sched: str = "cosine", min_lr: float = 0.0,
                 warmup_epochs: int = 0, warmup_lr: float = 0.0, decay_epochs: float = 30,
                 decay_rate: float = 0.1, decay_by_epoch: bool = True):
        if sched not in ("cosine", "step", "none"):
            raise ValueError(f"unknown schedule {sched!r}")
        self.base_lr, self.epochs, self.sched = base_lr, epochs, sched
        self.min_lr, self.warmup_epochs, self.warmup_lr = min_lr, warmup_epochs, warmup_lr
        self.decay_epochs, self.decay_rate, self.decay_by_epoch = decay_epochs, decay_rate, decay_by_epoch

    @classmethod
    def from_config(cls, cfg) -> LRSchedule:
        return cls(base_lr=cfg.lr, epochs=cfg.epochs, sched=cfg.sched, min_lr=cfg.min_lr,
                   warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, decay_epochs=cfg.decay_epochs,
                   decay_rate=cfg.decay_rate, decay_by_epoch=cfg.decay_by_epoch)

    def lr_at(self, epoch: float) -> float:
        """LR at fractional ``epoch`` (0 = start of training)."""
        if self.decay_by_epoch:
            epoch = math.floor(epoch)
        if epoch < self.warmup_epochs:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * epoch / self.warmup_epochs
        if self.sched == "none":
            return self.base_lr
        if self.sched == "step":
            return self.base_lr * self.decay_rate ** math.floor((epoch - self.warmup_epochs) / self.decay_epochs)
        span = max(self.epochs - self.warmup_epochs, 1)
        progress = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: Optimizer, epoch: float) -> float:
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
