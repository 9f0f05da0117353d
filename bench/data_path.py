"""Benchmark 7: input pipeline throughput vs what a training step consumes.

* CIFAR loader: a CIFAR-10-format directory written to a temp dir (5 train batches of 1000 images +
  a test batch, same pickle layout as the real files; smooth synthetic images so PNG sizes are
  realistic) read by ``dyrep_ray.data.build_datasets`` with the training transform, through the
  trainer's ``DataLoader`` settings (batch 128, shuffled);
* Parquet: the same images exported with ``data.parquet.export_parquet``; read back (a) through Ray Data
  with the consumer decoding every PNG (``iter_decoded_batches``), (a') through Ray Data with decode +
  augmentation in ``map_batches`` tasks fused with the read (``decoded_dataset`` + ``iter_ready_batches``),
  (a) and (a') alternating round by round in one run, their ratio in ``ray_data_decode``; and (b) the
  pyarrow-only ``ParquetImageDataset`` through a DataLoader;
* consumption: images/s of vgg16_cifar training steps at the recipe's batch size 128.
Ratio loader/consumption > 1 means the trainer never waits for data.
"""

from __future__ import annotations

import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dyrep_ray.data import build_datasets
from dyrep_ray.data.synthetic import build_synthetic
from dyrep_ray.data.transforms import DARTS_CUTOUT_LENGTH
from dyrep_ray.distributed.state_api import ray_init_without_dashboard
from dyrep_ray.models import build_model

from .common import interleaved_ratios, synchronize

PER_BATCH = 1000
RECIPE_BATCH = 128
#: The CIFAR recipe's augmentation (experiments/cifar10_vgg16.yaml): Cutout 16 on top of crop/flip.
RECIPE_AUG = {"cutout_length": DARTS_CUTOUT_LENGTH}


def write_tiny_cifar10(root: Path, per_batch: int = PER_BATCH, test: int = PER_BATCH) -> Path:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch, batches.meta (python format)."""
    train, _, _ = build_synthetic(image_size=32, seed=0, train_size=5 * per_batch + test, val_size=1)
    pixels = train.pixels.numpy() if hasattr(train.pixels, "numpy") else np.asarray(train.pixels)
    rows = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)).astype(np.uint8)
    labels = [int(t) for t in train.targets]
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)

    def dump(name, obj):
        (directory / name).write_bytes(pickle.dumps(obj, protocol=2))

    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": labels[sl],
                                     b"data": rows[sl], b"filenames": [b"x.png"] * per_batch})
    sl = slice(5 * per_batch, 5 * per_batch + test)
    dump("test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels[sl], b"data": rows[sl],
                        b"filenames": [b"x.png"] * test})
    dump("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch,
                          b"num_vis": 3072})
    return root


def _loader_rate(loader, epochs: int = 1) -> dict:
    rates = []
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for images, _ in loader:
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return {"images_per_s": rates[-1], "per_epoch": rates, "images": n}


def consumption_rate(device: torch.device, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)

    def step():
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = interleaved_ratios({"step": step}, reps=reps, warmup=1, device=device)
    synchronize(device)
    return {"batch": batch, "step_s": timing["step"]["median_s"], "images_per_s": batch / timing["step"]["median_s"]}


def run(device: torch.device, quick: bool = False, use_ray: bool = True, workers: tuple[int, ...] = (0, 2),
        consume_batch: int | None = None, per_batch: int | None = None) -> dict:
    consume_batch = consume_batch or (RECIPE_BATCH if (device.type == "cuda" or not quick) else 32)
    per_batch = per_batch or (200 if quick else PER_BATCH)
    out: dict = {"batch": RECIPE_BATCH, "images": 5 * per_batch}
    with tempfile.TemporaryDirectory(prefix="dyrep-bench-data-") as tmp:
        root = write_tiny_cifar10(Path(tmp) / "cifar", per_batch=per_batch, test=per_batch)
        train_ds, _, _ = build_datasets("cifar10", root, aug=RECIPE_AUG)
        loaders = {}
        for w in workers:
            loader = DataLoader(train_ds, batch_size=RECIPE_BATCH, shuffle=True, num_workers=w,
                                persistent_workers=w > 0, pin_memory=device.type == "cuda")
            loaders[f"cifar_workers{w}"] = _loader_rate(loader, epochs=2 if w else 1)
        out["loaders"] = loaders
        from dyrep_ray.data.parquet import ParquetImageDataset, export_parquet
        from dyrep_ray.distributed.ray_data import build_batch_decoder

        t0 = time.perf_counter()
        pq_dir = Path(tmp) / "parquet"
        export_parquet("cifar10", root, pq_dir, split="train", rows_per_shard=per_batch)
        out["parquet_export_s"] = time.perf_counter() - t0
        decoder = build_batch_decoder("cifar10", train=True, aug=RECIPE_AUG)
        pq_ds = ParquetImageDataset(pq_dir, transform=decoder.transform)
        loaders["parquet_pyarrow_workers0"] = _loader_rate(DataLoader(pq_ds, batch_size=RECIPE_BATCH, shuffle=True))
        if use_ray:
            ray_rates = _ray_data_rate(pq_dir, decoder)
            loaders["parquet_ray_data"] = ray_rates["consumer_decode"]
            loaders["parquet_ray_data_map_batches"] = ray_rates["map_batches_decode"]
            out["ray_data_decode"] = {k: v for k, v in ray_rates.items() if not isinstance(v, dict)}
    out["consumption"] = consumption_rate(device, consume_batch, reps=2 if quick else 3)
    rate = out["consumption"]["images_per_s"]
    out["ratios"] = {name: r["images_per_s"] / rate for name, r in loaders.items()}
    out["met"] = all(v > 1 for v in out["ratios"].values())
    return out


#: Alternating rounds of the two Ray Data variants (each round: one full pass of each, order rotating).
RAY_ROUNDS = 3


def _pass_rate(batches) -> tuple[float, int]:
    n, t = 0, time.perf_counter()
    for images, _ in batches:
        n += images.shape[0]
    return n / (time.perf_counter() - t), n


def _ray_data_rate(pq_dir: Path, decoder, rounds: int = RAY_ROUNDS, max_tasks: int | None = None) -> dict:
    """Images/s of the same shards through Ray Data, alternating round by round between
    ``consumer_decode`` (``iter_decoded_batches``: the consuming process decodes every PNG) and
    ``map_batches_decode`` (``decoded_dataset``: decode + augmentation in Ray tasks fused with the read, the
    consumer only normalizes uint8 or takes float32).  A warm-up pass of each absorbs planning and worker start-up;
    ``ratio_map_batches_vs_consumer`` is the median of the per-round ratios."""
    import os

    import ray

    from dyrep_ray.distributed.ray_data import (
        DECODE_MAX_TASKS,
        ReadyBatchCollate,
        decoded_dataset,
        iter_decoded_batches,
        iter_ready_batches,
        read_parquet_dataset,
    )

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False, **ray_init_without_dashboard())
    init_s = time.perf_counter() - t0
    tasks = max_tasks or min(DECODE_MAX_TASKS, max(1, int(ray.cluster_resources().get("CPU", 1)) - 1))
    try:
        raw = read_parquet_dataset(pq_dir)
        ready = decoded_dataset(raw, "cifar10", train=True, aug=RECIPE_AUG, max_tasks=tasks)
        collate = ReadyBatchCollate.for_transform("cifar10", train=True, aug=RECIPE_AUG)
        variants = {
            "consumer_decode": lambda: iter_decoded_batches(raw, decoder, batch_size=RECIPE_BATCH),
            "map_batches_decode": lambda: iter_ready_batches(ready, collate, batch_size=RECIPE_BATCH),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for name in names:  # warm-up
            _pass_rate(variants[name]())
        for r in range(rounds):
            for name in names[r % 2:] + names[:r % 2]:
                rate, n = _pass_rate(variants[name]())
                rates[name].append(rate)
        per_round = sorted(m / c for m, c in zip(rates["map_batches_decode"], rates["consumer_decode"]))
        out = {name: {"images_per_s": statistics.median(v), "per_round": v, "images": n} for name, v in rates.items()}
        out["ratio_map_batches_vs_consumer"] = per_round[len(per_round) // 2]
        out.update(ray_init_s=init_s, decode_tasks=tasks, cluster_cpus=ray.cluster_resources().get("CPU"))
        return out
    finally:
        if started:
            ray.shutdown()
