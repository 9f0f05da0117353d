"""One training step over a global batch (``global_batch_size``), computed the same at any world size.

What each rank does with its micro-batches (:mod:`~dyrep_ray.engine.global_batch` deals them):

* **Gradient**: each micro-batch's loss is its samples' summed loss divided by the step's sample count, so the
  sum over every micro-batch of every rank is the full-batch mean.  Backward runs on the bare model (the DDP
  wrapper is bypassed: no all-reduce per micro-batch, no buffer broadcast per forward); each micro-batch's
  gradient is added into one flat float64 sum (:class:`GradientSum`), all-reduced once per step.  Clipping,
  the non-finite check, loss scaling and DyRep's metric all see that full-batch gradient, identical on every
  rank.
* **BatchNorm running statistics** (:class:`CanonicalBatchNorm`): every micro-batch's forward starts from the
  step's statistics (a DBB block's train-mode padding reads them); each BN's batch mean and unbiased variance of
  every micro-batch are recorded, all ranks' rows are summed into one ``[micro-batches, stats]`` table (rows are
  disjoint: the sum is exact), and the momentum updates are applied in micro-batch order on every rank -- the
  sequence one worker computing all micro-batches would apply.  Its own updates during the forwards are undone.
* **Dropout**: the RNG is seeded from ``(seed, epoch, step, micro-batch)`` before each forward.

What still differs between world sizes is float summation order only: the gradient's float64 sum over
micro-batches (within a rank, then across ranks; cast to float32 it rarely differs in the last bit) and the
epoch's float64 loss sums.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..rundir.storage import RunStorage
from .data_source import GlobalStep
from .global_batch import rng_key
from .protocols import TrainContext

SAMPLE_RECORD_DIR = "sample_record"


class CanonicalBatchNorm:
    """BN running statistics as one sequence of momentum updates over a step's micro-batches (module doc).

    Assumes each BN module runs at most once per forward (true of every model here); one that does not run in
    a micro-batch's forward gets no update for it, as in plain training."""

    def __init__(self) -> None:
        self._bns: list[_BatchNorm] = []
        self._offsets: list[int] = []
        self._width = 0
        self._hooks: list[Any] = []
        self._row: torch.Tensor | None = None
        self._rows: dict[int, torch.Tensor] = {}
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _attach(self, model: nn.Module) -> None:
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if self._hooks and len(bns) == len(self._bns) and all(a is b for a, b in zip(bns, self._bns)):
            return
        self._detach()
        self._bns, self._offsets, width = bns, [], 0
        for index, bn in enumerate(bns):
            self._offsets.append(width)
            width += 2 * bn.num_features + 1  # mean, unbiased var, "ran" flag
            self._hooks.append(bn.register_forward_pre_hook(self._hook_for(index)))
        self._width = width

    def _detach(self) -> None:
        """The hooks live from :meth:`begin_step` to :meth:`finish_step` only: a hook on a BN makes a bn
        block take its per-branch forward (``rep/dbb_fused.fusable``), so hooks left on after a step would
        give evaluation, recalibration and an adjust other float rounding than in a process (resumed at an
        epoch's end) that has trained no step yet."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook_for(self, index: int) -> Callable:
        def hook(module: _BatchNorm, inputs: tuple) -> None:
            row = self._row
            if row is None or not module.training:
                return
            x = inputs[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1]
            c, at = module.num_features, self._offsets[index]
            row[at:at + c] = x.mean(dims)
            row[at + c:at + 2 * c] = x.var(dims, unbiased=True)
            row[at + 2 * c] = 1.0
        return hook

    def begin_step(self, model: nn.Module) -> None:
        self._attach(model)
        self._rows = {}
        self._snapshot = [(bn.running_mean.clone(), bn.running_var.clone(),  # type: ignore[union-attr]
                           None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
                          for bn in self._bns]

    def begin_micro(self, index: int, device: torch.device) -> None:
        # Every micro-batch's forward sees the step's starting statistics (a DBB block's train-mode padding
        # reads them), not the ones this rank's earlier micro-batches moved.
        self._restore()
        self._row = self._rows[index] = torch.zeros(self._width, device=device)

    @torch.no_grad()
    def _restore(self) -> None:
        for bn, (mean, var, tracked) in zip(self._bns, self._snapshot):
            bn.running_mean.copy_(mean)  # type: ignore[union-attr]
            bn.running_var.copy_(var)  # type: ignore[union-attr]
            if tracked is not None and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(tracked)

    def end_micro(self) -> None:
        self._row = None

    @torch.no_grad()
    def finish_step(self, n_micro: int, device: torch.device, ctx: TrainContext) -> None:
        """Collective (every rank): undo the forwards' own updates, apply every micro-batch's in order."""
        table = torch.zeros(n_micro, self._width, device=device)
        for index, row in self._rows.items():
            table[index] = row
        table = ctx.all_reduce_sum(table)
        self._restore()
        for bn, at in zip(self._bns, self._offsets):
            c = bn.num_features
            running_mean, running_var = bn.running_mean, bn.running_var
            assert running_mean is not None and running_var is not None
            ran = table[:, at + 2 * c]
            for j in range(n_micro):  # the sequence one worker would apply; a BN that did not run is skipped
                if bn.momentum is None:  # cumulative average
                    assert bn.num_batches_tracked is not None
                    bn.num_batches_tracked.add_(ran[j].long())
                    factor = ran[j] / bn.num_batches_tracked.clamp(min=1)
                else:
                    if bn.num_batches_tracked is not None:
                        bn.num_batches_tracked.add_(ran[j].long())
                    factor = ran[j] * bn.momentum
                running_mean.mul_(1 - factor).add_(table[j, at:at + c] * factor)
                running_var.mul_(1 - factor).add_(table[j, at + c:at + 2 * c] * factor)
        self._rows = {}
        self._detach()


class GradientSum:
    """The step's gradient: every micro-batch's gradient added in float64, summed over ranks (one flat
    all-reduce), then cast back.  float64 makes the sum's order (which micro-batches a rank holds, the reduction's
    order) all but irrelevant: the float32 result is the same at any world size unless a sum lands within
    float64 rounding of a float32 rounding boundary."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.total = sum(p.numel() for p in params)
        self.flat = torch.zeros(self.total + len(params), dtype=torch.float64, device=params[0].device)
        self.present = [False] * len(params)

    def add(self) -> None:
        """Move the parameters' ``.grad`` (one micro-batch's) into the sum."""
        at = 0
        for i, p in enumerate(self.params):
            n = p.numel()
            if p.grad is not None:
                self.flat[at:at + n] += p.grad.reshape(-1)
                self.flat[self.total + i] = 1.0
                self.present[i] = True
                p.grad = None
            at += n

    def reduce(self, ctx: TrainContext, had_data: bool) -> None:
        """Collective: the sum over ranks into every parameter's ``.grad``; ``None`` where no rank produced one
        (a rank that computed nothing this step learns which from the reduced flags: its one host sync)."""
        flat = ctx.all_reduce_sum(self.flat) if ctx.world_size > 1 else self.flat
        present = self.present if had_data else (flat[self.total:] > 0).tolist()
        at = 0
        for p, keep in zip(self.params, present):
            n = p.numel()
            p.grad = flat[at:at + n].view_as(p).to(p.dtype) if keep else None
            at += n


def forward_micro_batches(model: nn.Module, gstep: GlobalStep, *, seed: int, epoch: int, device: torch.device,
                          to_device: Callable[[torch.Tensor], torch.Tensor], autocast: Callable[[], Any],
                          smoothing: float, bn: CanonicalBatchNorm, backward: Callable[[torch.Tensor], None],
                          grads: GradientSum, transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                          ) -> tuple[torch.Tensor, int]:
    """Forward + backward of this rank's micro-batches of ``gstep`` (gradients accumulate); returns this rank's
    share of the step's mean loss (a device scalar, no sync) and its image count.  ``transform`` maps each
    micro-batch's loss before its backward."""
    share = torch.zeros((), device=device, dtype=torch.float64)
    images_seen = 0
    for micro in gstep.micros:
        torch.manual_seed(rng_key(seed, epoch, gstep.step, micro.index))  # dropout: keyed by micro-batch
        images, targets = to_device(micro.images), micro.targets.to(device, non_blocking=True)
        bn.begin_micro(micro.index, device)
        try:
            with autocast():
                loss = F.cross_entropy(model(images), targets, label_smoothing=smoothing, reduction="sum")
        finally:
            bn.end_micro()
        loss = transform(loss / gstep.size)  # the callbacks' transform_loss (fault injection)
        backward(loss)
        grads.add()
        share += loss.detach().double()
        images_seen += images.shape[0]
    return share, images_seen


# ------------------------------------------------------------------------------------- per-sample record
def record_name(epoch: int, first_step: int, world_size: int, rank: int) -> str:
    return f"{SAMPLE_RECORD_DIR}/epoch{epoch:04d}_step{first_step:06d}_w{world_size}_rank{rank}.json"


class SampleRecord:
    """``debug_sample_record``: the sample ids of every step this rank computed since it (re)started the
    epoch at ``first_step``, written at each checkpoint of the epoch (a record covers committed steps only)."""

    def __init__(self, storage: RunStorage, epoch: int, first_step: int, rank: int, world_size: int) -> None:
        self.storage, self.epoch, self.first_step = storage, epoch, first_step
        self.rank, self.world_size = rank, world_size
        self.steps: dict[int, list[list[int]]] = {}
        if rank == 0:  # a restart at first_step supersedes what earlier attempts recorded from there on
            for info in _record_files(storage):
                parsed = _parse_record(info.base_name)
                if parsed is not None and parsed[0] == epoch and parsed[1] >= first_step:
                    storage.fs.delete_file(info.path)

    def add(self, gstep: GlobalStep) -> None:
        self.steps[gstep.step] = [[m.index, *m.ids.tolist()] for m in gstep.micros]

    def write(self) -> None:
        self.storage.write_text(record_name(self.epoch, self.first_step, self.world_size, self.rank), json.dumps(
            {"epoch": self.epoch, "first_step": self.first_step, "world_size": self.world_size,
             "rank": self.rank, "steps": self.steps}))


def _record_files(storage: RunStorage) -> list[pafs.FileInfo]:
    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path(SAMPLE_RECORD_DIR), allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")]


def _parse_record(name: str) -> tuple[int, int] | None:
    try:
        epoch, step = name.split("_")[:2]
        return int(epoch.removeprefix("epoch")), int(step.removeprefix("step"))
    except ValueError:
        return None


def epoch_sample_counts(storage: RunStorage, epoch: int) -> dict[int, int]:
    """How often each sample id was computed in ``epoch`` (0-based) by the committed steps of every attempt: a
    segment started at step ``s`` supersedes earlier segments' steps from ``s`` on."""
    segments: dict[int, list[dict]] = {}
    for info in _record_files(storage):
        parsed = _parse_record(info.base_name)
        if parsed is not None and parsed[0] == epoch:
            text = storage.read_text(f"{SAMPLE_RECORD_DIR}/{info.base_name}")
            if text is not None:
                segments.setdefault(parsed[1], []).append(json.loads(text))
    starts = sorted(segments)
    counts: dict[int, int] = {}
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else None
        for record in segments[start]:
            for step, micros in record["steps"].items():
                if end is not None and int(step) >= end:
                    continue
                for micro in micros:
                    for sample in micro[1:]:
                        counts[sample] = counts.get(sample, 0) + 1
    return counts
