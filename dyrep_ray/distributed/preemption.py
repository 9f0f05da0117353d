"""Preemption: turn Ray's drain of a node hosting a rank into a mid-epoch checkpoint before the node goes.

Ray 2.60 watches node drains for every Ray Train worker group (``ray drain-node``, the autoscaler's spot
reclaims, ``cluster/preemption_watcher.py``) and answers ``ray.train.get_preemption_info()`` with the drained
nodes, their ranks and the deadline.  That call is a collective (rank 0's answer is broadcast), so every rank
must make it the same number of times: :class:`PreemptionCheckpoint` asks after every
``check_every_steps``-th step on every rank (the loop calls ``on_step_end`` equally often on all ranks).

On a drain every rank has just finished the same step; rank 0 writes a mid-epoch checkpoint of that
position, every rank reports (a barrier: nobody leaves before the checkpoint is complete), and the ranks then
wait, training no further, until Ray ends the worker group (at the drain deadline, or when the node dies) and
restarts the run from that checkpoint (``FailureConfig.max_preemption_failures``, unlimited).  At most the step
in flight when the drain arrives, plus the steps until the next check, are redone: none is lost after the
checkpoint, because no rank trains past it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..engine.callbacks import TrainerCallback
from ..rundir.layout import PREEMPTED_METRIC

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.protocols import TrainerView

logger = logging.getLogger(__name__)

#: Steps between two ``get_preemption_info`` collectives (a Ray RPC round trip each; a step is far longer).
PREEMPTION_CHECK_STEPS = 5
#: How often a rank that has checkpointed for a preemption looks up while it waits for Ray to restart it.
PREEMPTION_WAIT_POLL_S = 1.0


class PreemptionCheckpoint(TrainerCallback):
    """Checks for a drain every ``check_every_steps`` steps; on one, checkpoints and waits for the restart."""

    def __init__(self, check_every_steps: int = PREEMPTION_CHECK_STEPS,
                 wait_poll_s: float = PREEMPTION_WAIT_POLL_S) -> None:
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps must be >= 1, got {check_every_steps}")
        self.check_every_steps, self.wait_poll_s = check_every_steps, wait_poll_s
        self.steps_seen = 0  # per process: every rank counts the same steps

    def on_step_end(self, trainer: TrainerView, epoch: int, step: int, loss: torch.Tensor) -> None:
        import ray.train

        self.steps_seen += 1
        if self.steps_seen % self.check_every_steps:
            return
        info = ray.train.get_preemption_info()
        if info is None:
            return
        global_step = trainer.state.global_step
        logger.warning("preemption: nodes %s (ranks %s) are drained (deadline %s ms); checkpointing at epoch %d "
                       "step %d (global step %d)", info.preempted_node_ids, info.preempted_ranks, info.deadline_ms,
                       epoch + 1, step + 1, global_step)
        name = trainer.save_mid_epoch_checkpoint()
        # Every rank reports: when this returns, rank 0's checkpoint is complete and no rank trains on.
        ray.train.report({PREEMPTED_METRIC: global_step, "epoch": epoch + 1})
        if trainer.ctx.is_main:
            logger.warning("preemption: checkpoint %s written; waiting for Ray to restart the run from it", name)
        while True:  # Ray ends this worker group at the deadline (or when the node dies) and restarts the run
            time.sleep(self.wait_poll_s)
