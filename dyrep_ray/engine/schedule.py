"""Learning-rate schedules (cosine / step / constant) with linear warmup.

The LR is a pure function of the position in training (epoch, step), so a resumed run needs no scheduler state
and a structure change cannot move the schedule.  Two rules (``sched_rule``):

* ``original`` (default): the values the original's ``GradualWarmupScheduler`` (``lib/utils/scheduler.py``) gives,
  stepped after every iteration with the global step as ``tools/train.py`` does: the warm-up rises once per
  epoch whatever ``decay_by_epoch`` says (``last_epoch // step_size * step_size``); after a warm-up the decay
  runs one step behind (``epoch - total_epoch - 1``); ``step`` decays by steps (``decay_epochs`` may be
  fractional); without warm-up the very first step already has the schedule's step-1 value.
* ``fractional`` (dyrep-ray's first version): a function of the fractional epoch; with ``decay_by_epoch:
  false`` the warm-up rises every step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

SCHED_RULES = ("original", "fractional")


class LRSchedule:
    def __init__(self, *, base_lr: float, epochs: int, sched: str = "cosine", min_lr: float = 0.0,
                 warmup_epochs: int = 0, warmup_lr: float = 0.0, decay_epochs: float = 30,
                 decay_rate: float = 0.1, decay_by_epoch: bool = True, rule: str = "original"):
        if sched not in ("cosine", "step", "none"):
            raise ValueError(f"unknown schedule {sched!r}")
        if rule not in SCHED_RULES:
            raise ValueError(f"unknown schedule rule {rule!r}; choose one of {list(SCHED_RULES)}")
        self.rule = rule
        self.base_lr, self.epochs, self.sched = base_lr, epochs, sched
        self.min_lr, self.warmup_epochs, self.warmup_lr = min_lr, warmup_epochs, warmup_lr
        self.decay_epochs, self.decay_rate, self.decay_by_epoch = decay_epochs, decay_rate, decay_by_epoch

    @classmethod
    def from_config(cls, cfg) -> LRSchedule:
        return cls(base_lr=cfg.lr, epochs=cfg.epochs, sched=cfg.sched, min_lr=cfg.min_lr,
                   warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, decay_epochs=cfg.decay_epochs,
                   decay_rate=cfg.decay_rate, decay_by_epoch=cfg.decay_by_epoch, rule=str(cfg.sched_rule))

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

    def lr_for_step(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """LR of training step ``step`` (0-based) of epoch ``epoch`` (0-based) under this schedule's rule."""
        if self.rule == "fractional":
            return self.lr_at(epoch + min(step / steps_per_epoch, 1.0))
        return self._original_lr(epoch * steps_per_epoch + step, steps_per_epoch)

    def _original_lr(self, s: int, spe: int) -> float:
        """The original scheduler's LR after ``scheduler.step(s)`` (before any step for ``s == 0``)."""
        warmup = self.warmup_epochs * spe
        if warmup > 0 and s <= warmup:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * (s // spe * spe) / warmup
        if warmup > 0:
            e = s - warmup - 1
        else:  # total_epoch = -1: the decay sees s itself; at s == 0 the constructor's own step() gave e = 1
            e = max(s, 1)
        if self.sched == "none":
            return self.base_lr
        if self.sched == "step":  # StepLR on steps: decay_by_epoch is forced off
            return self.base_lr * self.decay_rate ** (e // (self.decay_epochs * spe))
        if self.decay_by_epoch and not (warmup == 0 and s == 0):
            e = e // spe * spe
        t_max = max((self.epochs - self.warmup_epochs) * spe, 1)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * e / t_max)) / 2

    def apply(self, optimizer: Optimizer, epoch: float) -> float:
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def apply_step(self, optimizer: Optimizer, epoch: int, step: int, steps_per_epoch: int) -> float:
        lr = self.lr_for_step(epoch, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
