"""DyRep in a plain ``torchrun`` DDP script: no dyrep-ray trainer, no Ray.

Run (CPU, two processes on gloo; on GPUs the backend is nccl)::

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --epochs 3 --out /tmp/dyrep-ddp
    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --epochs 5 --out /tmp/dyrep-ddp --resume

What DyRep needs from a loop, step by step (search for "DyRep:" below):

1. ``dyrep.record_metrics()`` after every backward (DDP has averaged the gradients).
2. At an adjust point, on *every* rank: ``dyrep.plan()`` (it all-reduces the metrics), then
   broadcast rank 0's plan so every rank applies the same one.
3. Drop the DDP wrapper, ``dyrep.apply(plan, optimizer, recal_fn)`` (structure change, seeded
   init, BN recalibration, optimizer surgery), re-wrap in a new DDP (DDP cannot see new
   parameters; its constructor broadcasts rank 0's weights and buffers).
   Steps 2 and 3 are ``adjust_structure`` (the dyrep-ray trainer's own sequence); this script
   gives it the three things that are its own: the broadcast, the placement and the DDP wrapper.
4. Checkpoint the structure graph next to the state_dict; on resume rebuild the structure on a
   fresh model with ``restore_graph`` *before* ``load_state_dict``.

Writes ``--out``/checkpoint.pt (resumable) and ``--report`` (JSON: per-adjust events and every
rank's structure+weights digest, used by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dyrep_ray.data.synthetic import build_synthetic
from dyrep_ray.engine.adjust import AdjustHooks, adjust_structure, broadcast_from_rank0
from dyrep_ray.integrations.common import (
    canonical_param_order,
    optimizer_state_digest,
    replica_digest,
)
from dyrep_ray.models import build_model
from dyrep_ray.rep import (
    DyRep,
    param_groups_for,
    recalibrate_bn,
    restore_graph,
    structure_graph,
)

CHECKPOINT_NAME = "checkpoint.pt"
STRUCTURE_NAME = "structure.json"
REPORT_NAME = "report.json"
NUM_CLASSES = 10
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
RECAL_BATCHES = 4  # batches per rank used to re-estimate a new branch's BN statistics
VAL_SIZE = 64  # the synthetic builder always makes a val split; this script does not use it


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoint.pt / structure.json")
    p.add_argument("--report", type=Path, default=None, help=f"JSON report path (default: OUT/{REPORT_NAME})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--adjust-every", type=int, default=1, help="DyRep adjust interval in epochs")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP would broadcast them anyway)

    train_ds, _, _ = build_synthetic(image_size=args.image_size, seed=args.seed, train_size=args.train_size,
                                     val_size=VAL_SIZE)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler)

    model = build_model("small_cnn", NUM_CLASSES)
    checkpoint_path = args.out / CHECKPOINT_NAME
    checkpoint = None
    if args.resume:
        # weights_only: a checkpoint is data (tensors, dicts, strings), never code.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        restore_graph(model, checkpoint["graph"])  # DyRep: rebuild the grown structure first ...
        model.load_state_dict(checkpoint["model"])  # ... so the strict load finds every tensor
    model.to(device)

    dyrep = DyRep(model, seed=args.seed)
    optimizer = torch.optim.SGD(param_groups_for(model, WEIGHT_DECAY), lr=args.lr, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    start_epoch = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])  # index-based: valid thanks to canonical_param_order
        scheduler.load_state_dict(checkpoint["scheduler"])
        dyrep.load_state_dict(checkpoint["dyrep"])
        start_epoch = int(checkpoint["epoch"])
    ddp = wrap(model, device)

    report = {"world_size": world, "start_epoch": start_epoch, "start_graph": structure_graph(model),
              "start_digests": gather(replica_digest(model), world),
              "start_optimizer_digest": optimizer_state_digest(optimizer, model), "adjusts": [], "epochs": []}

    def recal(net: torch.nn.Module, bns: list) -> None:
        batches = (images.to(device) for images, _ in loader)
        recalibrate_bn(net, batches, bns, RECAL_BATCHES)  # averages the statistics across ranks

    def unwrap() -> None:  # drop the old wrapper and its gradient hooks before the structure changes
        nonlocal ddp
        ddp = None

    def place() -> None:
        canonical_param_order(optimizer, model)
        model.to(device)

    def rewrap() -> None:
        nonlocal ddp
        ddp = wrap(model, device)

    hooks = AdjustHooks(broadcast=broadcast_from_rank0, place=place, unwrap=unwrap, rewrap=rewrap)

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            loss = F.cross_entropy(ddp(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dyrep.record_metrics()  # DyRep: after backward, before step (device work only)
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        scheduler.step()
        dist.all_reduce(loss_sum)
        report["epochs"].append({"epoch": epoch + 1, "train_loss": float(loss_sum) / (steps * world)})

        if (epoch + 1) % args.adjust_every == 0 and epoch + 1 < args.epochs:
            # DyRep: every rank; rank 0 decides for everyone
            events = adjust_structure(dyrep, optimizer, recal, hooks).events  # typed events -> JSON dicts
            report["adjusts"].append({"epoch": epoch + 1, "events": events,
                                      "digests": gather(replica_digest(model), world)})
            if rank == 0:
                print(f"epoch {epoch + 1}: " + ", ".join(f"{e['op']} {e['path']}" for e in events), flush=True)

        if rank == 0:
            save_checkpoint(args.out, epoch + 1, model, optimizer, scheduler, dyrep)
        dist.barrier()  # the checkpoint is complete before any rank moves on (or exits)

    report["final_graph"] = structure_graph(model)
    # Parameters only: BN running statistics differ between ranks after the last forward pass.
    report["final_param_digests"] = gather(replica_digest(model, buffers=False), world)
    report["checkpoint_digest"] = replica_digest(model) if rank == 0 else None  # what rank 0 saved last
    report["checkpoint_optimizer_digest"] = optimizer_state_digest(optimizer, model) if rank == 0 else None
    if rank == 0:
        report_path = args.report or args.out / REPORT_NAME
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


def gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(out: Path, epoch: int, model, optimizer, scheduler, dyrep: DyRep) -> None:
    """Structure graph + state in one file, written to a temp name and renamed (never half-written)."""
    out.mkdir(parents=True, exist_ok=True)
    graph = structure_graph(model)
    state = {"epoch": epoch, "graph": graph, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "dyrep": dyrep.state_dict()}
    tmp = out / f".{CHECKPOINT_NAME}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT_NAME)
    (out / STRUCTURE_NAME).write_text(json.dumps(graph, indent=1))


if __name__ == "__main__":
    main()
