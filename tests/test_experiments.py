"""Every experiments/*.yaml parses and starts: a few real training steps (and one adjust) on tiny inputs
in the dataset's own on-disk format, the model scaled down only by input size and batch."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.layout import METRICS_FILE
from dyrep_ray.engine.loop import train

EXPERIMENTS = sorted(Path(__file__).resolve().parent.parent.glob("experiments/*.yaml"))
TARGET_COMMENT = "%"  # each file's first line names the paper number it targets


def _write_cifar(root: Path, name: str, n_train=8, n_test=4) -> Path:
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    sub = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    sub.mkdir(parents=True)

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, n).tolist()}

    if name == "cifar10":
        for i in range(1, 6):
            (sub / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 4 or 1)))
        (sub / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
        (sub / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    else:
        (sub / "train").write_bytes(pickle.dumps(batch(n_train)))
        (sub / "test").write_bytes(pickle.dumps(batch(n_test)))
        (sub / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    return root


def _write_imagefolder(root: Path, per_class=2) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp_data")
    return {"cifar10": _write_cifar(root / "c10", "cifar10"), "cifar100": _write_cifar(root / "c100", "cifar100"),
            "imagenet": _write_imagefolder(root / "inet")}


def test_every_experiment_has_a_target_comment():
    assert len(EXPERIMENTS) >= 9
    for path in EXPERIMENTS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and (TARGET_COMMENT in first or path.name == "default.yaml"), path.name


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_parses_and_starts(path, data_dirs, tmp_path):
    cfg = load_config(path)
    assert cfg.epochs >= 1
    overrides = ["epochs=2", "batch_size=4", "image_size=32", "workers=1", "use_gpu=false", "num_data_workers=0",
                 "dyrep_recal_bn_iters=1", "dyrep_adjust_interval=1", "synthetic_train_size=16",
                 "synthetic_val_size=8", "warmup_epochs=0"]
    if cfg.dataset != "synthetic":
        overrides.append(f"data_dir={data_dirs[cfg.dataset]}")
    cfg = load_config(path, overrides)
    summary = train(cfg, LocalContext(torch.device("cpu"), tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(m["train_loss"]) for m in lines)
    assert summary["grows"] == cfg.dyrep_grow_topk * (1 if cfg.dyrep else 0)
