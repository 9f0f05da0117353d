"""Decode + augmentation inside Ray Data (``map_batches(DecodeAugment)``), against the ``--local`` reader.

Real shards written by ``export_parquet``, a real Ray Data pipeline on the shared Ray instance.  Eval batches must
equal, bit for bit, what ``ParquetImageDataset`` + ``sample_transform`` give for the same rows; train augmentation
must differ across epochs and repeat for the same seed; a row that does not decode is named by file and row.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dyrep_ray.data.errors import DatasetError
from dyrep_ray.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    ParquetImageDataset,
    export_parquet,
    sample_seed,
    sample_transform,
    seed_sample_rngs,
    split_transform,
)
from dyrep_ray.distributed.ray_data import (
    DecodeAugment,
    ReadyBatchCollate,
    decoded_dataset,
    iter_ready_batches,
    read_parquet_dataset,
)

ROWS = 40
ROWS_PER_SHARD = 16  # 3 shard files: rows cross file boundaries
#: (dataset whose transform is applied, image size): CIFAR's tensor-only val, ImageNet's resize + centre crop.
EVAL_CASES = [("cifar10", 32), ("imagenet", 24)]
#: CIFAR recipe augmentation: crop/flip then Cutout after Normalize (the float32 output path).
CUTOUT = {"cutout_length": 8}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest") / "val"
    export_parquet("synthetic", None, root, split="val", rows_per_shard=ROWS_PER_SHARD, seed=3,
                   synthetic_train_size=8, synthetic_val_size=ROWS)
    return root


def _sorted_rows(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, bytes]]:
    """Rows as (label, exact float bytes), sorted: Ray Data's streaming order is not the file order."""
    return sorted((int(label), image.contiguous().numpy().tobytes()) for image, label in zip(images, labels))


def _local(shards, dataset: str, image_size: int, *, train: bool = False, aug=None) -> tuple[torch.Tensor, ...]:
    local = ParquetImageDataset(shards, sample_transform(dataset, train=train, image_size=image_size, aug=aug))
    items = [local[i] for i in range(len(local))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def _pipeline(shards, dataset: str, image_size: int, *, train: bool = False, aug=None, seed: int = 0,
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ds = decoded_dataset(read_parquet_dataset(shards), dataset, train=train, image_size=image_size, aug=aug,
                         seed=seed, epoch=epoch, max_tasks=2)
    collate = ReadyBatchCollate.for_transform(dataset, train=train, image_size=image_size, aug=aug)
    batches = list(iter_ready_batches(ds, collate, batch_size=12))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# ------------------------------------------------------------------ no Ray: the shared per-image transform
@pytest.mark.parametrize("dataset,image_size", EVAL_CASES)
def test_split_transform_is_bitwise_the_full_transform(shards, dataset, image_size):
    local = ParquetImageDataset(shards)
    full = sample_transform(dataset, train=False, image_size=image_size)
    decode = DecodeAugment(dataset, train=False, image_size=image_size)
    batch = {IMAGE_COLUMN: np.array(local.images[:6], dtype=object), LABEL_COLUMN: np.array(local.targets[:6])}
    out = decode(batch)
    assert out[IMAGE_COLUMN].dtype == np.uint8  # no post-normalize step: the 4x smaller transfer format
    images, labels = ReadyBatchCollate.for_transform(dataset, train=False, image_size=image_size)(out)
    want = torch.stack([full(local[i][0]) for i in range(6)])
    assert images.dtype == torch.float32 and torch.equal(images, want)
    assert labels.tolist() == local.targets[:6]


def test_train_row_seed_reproduces_the_local_transform(shards):
    """DecodeAugment's train output is ``sample_transform`` run under the row's seed: one implementation."""
    local = ParquetImageDataset(shards)
    full = sample_transform("cifar10", train=True, aug=CUTOUT)
    assert split_transform(full).after_normalize  # Cutout -> float32 out of the decode actor
    decode = DecodeAugment("cifar10", train=True, aug=CUTOUT, seed=7, epoch=2)
    out = decode({IMAGE_COLUMN: np.array(local.images[:4], dtype=object), LABEL_COLUMN: np.array(local.targets[:4])})
    assert out[IMAGE_COLUMN].dtype == np.float32
    for i in range(4):
        seed_sample_rngs(sample_seed(7, 2, local.images[i], local.targets[i]))
        assert torch.equal(torch.from_numpy(out[IMAGE_COLUMN][i]), full(local[i][0]))
    assert sample_seed(7, 2, local.images[0], 0) != sample_seed(7, 3, local.images[0], 0)
    assert sample_seed(7, 2, local.images[0], 0) != sample_seed(8, 2, local.images[0], 0)


def test_decode_augment_names_a_bad_row_without_ray(tmp_path):
    path = _corrupt_shard(tmp_path)
    with pytest.raises(DatasetError, match=rf"{path.name} row 2: not a decodable image"):
        DecodeAugment("cifar10", train=False)({IMAGE_COLUMN: np.array(_CORRUPT_ROWS, dtype=object),
                                               LABEL_COLUMN: np.arange(4), "path": np.array([str(path)] * 4)})


_GOOD = io.BytesIO()
Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(_GOOD, format="PNG")
_CORRUPT_ROWS = [_GOOD.getvalue()] * 2 + [_GOOD.getvalue()[:30], _GOOD.getvalue()]


def _corrupt_shard(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad" / "val-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({IMAGE_COLUMN: pa.array(_CORRUPT_ROWS, pa.binary()),
                             LABEL_COLUMN: pa.array([0, 1, 2, 3], pa.int64())}), path)
    return path


# ------------------------------------------------------------------ a real Ray Data pipeline
@pytest.mark.ray
@pytest.mark.parametrize("dataset,image_size", EVAL_CASES)
def test_pipeline_eval_batches_equal_local_exactly(ray_session, shards, dataset, image_size):
    got = _pipeline(shards, dataset, image_size)
    want = _local(shards, dataset, image_size)
    assert got[0].shape == (ROWS, 3, image_size, image_size) and got[0].dtype == torch.float32
    assert _sorted_rows(*got) == _sorted_rows(*want)


@pytest.mark.ray
def test_pipeline_train_augmentation_per_epoch_and_reproducible(ray_session, shards):
    epoch0 = _sorted_rows(*_pipeline(shards, "cifar10", 32, train=True, aug=CUTOUT, seed=5, epoch=0))
    again = _sorted_rows(*_pipeline(shards, "cifar10", 32, train=True, aug=CUTOUT, seed=5, epoch=0))
    epoch1 = _sorted_rows(*_pipeline(shards, "cifar10", 32, train=True, aug=CUTOUT, seed=5, epoch=1))
    plain = _sorted_rows(*_local(shards, "cifar10", 32))
    assert epoch0 == again  # same seed and epoch: the same crops, flips and holes
    assert epoch0 != epoch1 and epoch0 != plain
    assert [label for label, _ in epoch0] == [label for label, _ in epoch1]  # same rows, other augmentation
    same_row = sum(a == b for a, b in zip(epoch0, epoch1))
    assert same_row < ROWS // 2  # most rows change between epochs (a flip-only draw can repeat one)


@pytest.mark.ray
def test_pipeline_names_corrupt_row(ray_session, tmp_path):
    path = _corrupt_shard(tmp_path)
    ds = decoded_dataset(read_parquet_dataset(path.parent), "cifar10", train=False, max_tasks=1)
    with pytest.raises(Exception) as info:
        list(iter_ready_batches(ds, ReadyBatchCollate.for_transform("cifar10", train=False), batch_size=4))
    assert f"{path.name} row 2: not a decodable image" in str(info.value)
    assert isinstance(info.value, DatasetError) and "\n" not in str(info.value)  # one line, unwrapped


@pytest.mark.ray
def test_bench_ray_data_decode_ratio_smoke(ray_session, tmp_path):
    """bench/data_path.py's alternating consumer-decode vs map_batches-decode measurement, on 40 images."""
    from bench import data_path
    from dyrep_ray.distributed.ray_data import build_batch_decoder

    root = data_path.write_tiny_cifar10(tmp_path / "cifar", per_batch=8, test=4)
    export_parquet("cifar10", root, tmp_path / "pq", split="train", rows_per_shard=16)
    decoder = build_batch_decoder("cifar10", train=True, aug=data_path.RECIPE_AUG)
    out = data_path._ray_data_rate(tmp_path / "pq", decoder, rounds=1, max_tasks=1)
    for name in ("consumer_decode", "map_batches_decode"):
        assert out[name]["images"] == 40 and len(out[name]["per_round"]) == 1 and out[name]["images_per_s"] > 0
    ratio = out["map_batches_decode"]["images_per_s"] / out["consumer_decode"]["images_per_s"]
    assert out["ratio_map_batches_vs_consumer"] == pytest.approx(ratio)
    assert out["decode_tasks"] == 1


@pytest.mark.ray
def test_ray_data_reads_exported_shards(ray_session, tmp_path):
    from dyrep_ray.data.parquet import export_parquet
    from dyrep_ray.data.synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD
    from dyrep_ray.distributed.ray_data import build_batch_decoder, iter_decoded_batches, read_parquet_dataset
    from tests.test_data import SMALL_TRAIN, SMALL_VAL, _small_synthetic

    _, val, _ = _small_synthetic()
    export_parquet("synthetic", None, tmp_path, split="val", rows_per_shard=20,
                   synthetic_train_size=SMALL_TRAIN, synthetic_val_size=SMALL_VAL)
    dataset = read_parquet_dataset(tmp_path)
    assert dataset.count() == SMALL_VAL
    decoder = build_batch_decoder("synthetic", train=False)
    seen_images, seen_labels = [], []
    for images, labels in iter_decoded_batches(dataset, decoder, batch_size=16):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        seen_images.append(images)
        seen_labels.append(labels)
    labels = torch.cat(seen_labels)
    assert labels.numel() == SMALL_VAL
    assert sorted(labels.tolist()) == sorted(val.targets)
    # order may differ across blocks: compare multisets of (label, exact integer pixel checksum)
    images = torch.cat(seen_images)
    mean, std = SYNTHETIC_MEAN[0], SYNTHETIC_STD[0]
    checksums = ((images * std + mean) * 255).round().long().sum(dim=(1, 2, 3))
    got = sorted(zip(labels.tolist(), checksums.tolist()))
    want = sorted(zip(val.targets, val.pixels.long().sum(dim=(1, 2, 3)).tolist()))
    assert got == want
