"""DyRep in a PyTorch Lightning project: add ``DyRepCallback`` to the Trainer, nothing else changes.

Run (CPU, two DDP processes on gloo)::

    python examples/lightning_dyrep.py --devices 2 --epochs 3 --out /tmp/dyrep-lightning
    python examples/lightning_dyrep.py --devices 2 --epochs 5 --out /tmp/dyrep-lightning --resume

``--resume`` calls ``trainer.fit(model, ckpt_path=OUT/last.ckpt)`` on a *fresh* (plain) model: the
callback rebuilds the grown structure before Lightning loads the weights.  ``--report`` (default
OUT/report.json) records per-adjust events and every rank's structure+weights digest, which
tests/test_examples.py checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dyrep_ray.data.synthetic import build_synthetic
from dyrep_ray.integrations.common import optimizer_state_digest, replica_digest
from dyrep_ray.integrations.lightning import DyRepCallback
from dyrep_ray.models import build_model
from dyrep_ray.rep import param_groups_for, structure_graph

LAST_CHECKPOINT = "last.ckpt"
REPORT_NAME = "report.json"
NUM_CLASSES = 10
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
RECAL_BATCHES = 4
VAL_SIZE = 64  # the synthetic builder always makes a val split; this example does not use it


class LitClassifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about DyRep."""

    def __init__(self, lr: float, epochs: int):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model("small_cnn", NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = F.cross_entropy(self(images), targets)
        self.log("train_loss", loss, on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(param_groups_for(self, WEIGHT_DECAY), lr=self.hparams.lr, momentum=MOMENTUM)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ReplicaReport(pl.Callback):
    """Example-only bookkeeping: every rank's digests at start, after each adjust, and at the end."""

    def __init__(self, dyrep: DyRepCallback, path: Path):
        self.dyrep, self.path = dyrep, path
        self.report: dict = {"adjusts": []}

    @staticmethod
    def _gather(obj) -> list:
        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def on_train_start(self, trainer, pl_module):
        self.report.update(world_size=trainer.world_size, start_epoch=trainer.current_epoch,
                           start_graph=structure_graph(pl_module),
                           start_digests=self._gather(replica_digest(pl_module)),
                           start_optimizer_digest=optimizer_state_digest(trainer.optimizers[0], pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs after DyRepCallback's hook (callbacks run in list order): DDP was just rebuilt, and its
        # constructor synchronized every parameter and buffer, so full digests must agree.
        epoch = trainer.current_epoch + 1
        events = [e for e in self.dyrep.events if e["epoch"] == epoch]
        if events:
            self.report["adjusts"].append({"epoch": epoch, "events": events,
                                           "digests": self._gather(replica_digest(pl_module))})

    def on_train_end(self, trainer, pl_module):
        self.report.update(final_graph=structure_graph(pl_module),
                           final_param_digests=self._gather(replica_digest(pl_module, buffers=False)),
                           checkpoint_digest=replica_digest(pl_module),
                           checkpoint_optimizer_digest=optimizer_state_digest(trainer.optimizers[0], pl_module),
                           events=self.dyrep.events, epochs_completed=trainer.current_epoch)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.report, indent=1))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--report", type=Path, default=None, help=f"JSON report (default OUT/{REPORT_NAME})")
    p.add_argument("--resume", action="store_true", help=f"trainer.fit(ckpt_path=OUT/{LAST_CHECKPOINT})")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (>1: strategy ddp on gloo)")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    pl.seed_everything(args.seed, workers=True, verbose=False)
    train_ds, _, _ = build_synthetic(image_size=args.image_size, seed=args.seed, train_size=args.train_size,
                                     val_size=VAL_SIZE)
    loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True)  # Lightning adds DistributedSampler
    dyrep = DyRepCallback(recal_bn_batches=RECAL_BATCHES, seed=args.seed)
    report = ReplicaReport(dyrep, args.report or args.out / REPORT_NAME)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, callbacks=[dyrep, report, ModelCheckpoint(dirpath=args.out, save_last=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    model = LitClassifier(args.lr, args.epochs)
    trainer.fit(model, loader, ckpt_path=args.out / LAST_CHECKPOINT if args.resume else None)
    if trainer.is_global_zero:
        print(f"done: {len(dyrep.events)} DyRep events: "
              + ", ".join(f"{e['op']} {e['path']} (epoch {e['epoch']})" for e in dyrep.events), flush=True)


if __name__ == "__main__":
    main()
