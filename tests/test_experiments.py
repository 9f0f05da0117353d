"""Every experiments/*.yaml parses and starts: a few real training steps (and one adjust) on tiny inputs
in the dataset's own on-disk format, the model scaled down only by input size and batch."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dyrep_ray.engine.config import TrainConfig, load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.rundir.layout import METRICS_FILE

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
PAPER_DIR = EXPERIMENTS_DIR / "paper"
EXPERIMENTS = sorted(EXPERIMENTS_DIR.glob("*.yaml")) + sorted(PAPER_DIR.glob("*.yaml"))
TARGET_COMMENT = "%"  # each file's first line names the paper number it targets
PAPER_ROWS = ("cifar10_vgg16", "cifar100_vgg16", "imagenet_resnet18")
PAPER_MODES = {"plain": {"dyrep": False}, "dbb": {"dyrep": False, "dbb": True}, "dyrep": {"dyrep": True}}
HAS_DBB_KEY = "dbb" in {f.name for f in dataclasses.fields(TrainConfig)}
NO_DBB_REASON = "TrainConfig has no `dbb` field yet (the static-DBB baseline)"


def _needs_dbb(path: Path) -> bool:
    import yaml

    return "dbb" in (yaml.safe_load(path.read_text()) or {})


def _experiment_param(path: Path):
    marks = [pytest.mark.skip(reason=NO_DBB_REASON)] if _needs_dbb(path) and not HAS_DBB_KEY else []
    return pytest.param(path, id=str(path.relative_to(EXPERIMENTS_DIR).with_suffix("")), marks=marks)


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
    assert len(EXPERIMENTS) >= 18
    for path in EXPERIMENTS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and (TARGET_COMMENT in first or path.name == "default.yaml"), path.name


@pytest.mark.parametrize("path", [_experiment_param(p) for p in EXPERIMENTS])
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


# The original's values (image_classification_sota configs/strategies/DyRep/*.yaml).
ORIGINAL_RECIPE_VALUES = {
    "imagenet_mobilenet_v1.yaml": {"epochs": 90},
    "imagenet_repvgg_a2.yaml": {"color_jitter": 0.0},
    **{f"imagenet_repvgg_{name}.yaml": {"min_lr": 1e-7, "warmup_lr": 1e-6, "warmup_epochs": 5,
                                         "aa": "rand-m9-mstd0.5", "smoothing": 0.1, "reprob": 0.2,
                                         "remode": "pixel", "color_jitter": 0.0, "interpolation": "bilinear"}
       for name in ("b2g4", "b3")},
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_RECIPE_VALUES))
def test_recipe_values_match_the_original(name):
    cfg = load_config(EXPERIMENTS_DIR / name)
    actual = {key: getattr(cfg, key) for key in ORIGINAL_RECIPE_VALUES[name]}
    assert actual == ORIGINAL_RECIPE_VALUES[name]
    assert "reconstruct" not in (EXPERIMENTS_DIR / name).read_text().lower()
    assert "not available offline" not in (EXPERIMENTS_DIR / name).read_text()


@pytest.mark.parametrize("row", PAPER_ROWS)
def test_paper_rows_differ_from_their_experiment_only_in_the_mode_keys(row):
    import yaml

    base = yaml.safe_load((EXPERIMENTS_DIR / f"{row}.yaml").read_text())
    for mode, keys in PAPER_MODES.items():
        path = PAPER_DIR / f"{row}_{mode}.yaml"
        data = yaml.safe_load(path.read_text())
        assert {k: data.get(k, False) for k in ("dyrep", "dbb")} == {"dbb": False, **keys}, path.name
        assert {k: v for k, v in data.items() if k not in ("dyrep", "dbb")} == \
            {k: v for k, v in base.items() if k not in ("dyrep", "dbb")}, path.name
        assert path.read_text().splitlines()[0].startswith("# Target: DyRep paper"), path.name
