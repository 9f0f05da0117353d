"""Datasets: synthetic (determinism, learnability), CIFAR (format, errors, safe unpickling), ImageFolder,
Parquet export/read-back, and (marked ``ray``) Ray Data batches."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dyrep_ray.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    Cutout,
    DatasetError,
    build_datasets,
    restricted_load,
)
from dyrep_ray.data.parquet import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    ParquetImageDataset,
    decode_image,
    export_parquet,
    read_parquet_metadata,
)
from dyrep_ray.distributed.ray_data import build_batch_decoder

CIFAR_ROW = 3 * 32 * 32
SMALL_TRAIN = 256
SMALL_VAL = 64


# ---------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------


def _small_synthetic(seed: int = 0, image_size: int = 32):
    return build_datasets(
        "synthetic", seed=seed, image_size=image_size, synthetic_train_size=SMALL_TRAIN, synthetic_val_size=SMALL_VAL
    )


def test_synthetic_shapes_dtypes_and_balance():
    train, val, num_classes = _small_synthetic()
    assert num_classes == 10
    assert (len(train), len(val)) == (SMALL_TRAIN, SMALL_VAL)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < num_classes
    assert train.images.shape == (SMALL_TRAIN, 3, 32, 32)
    counts = np.bincount(train.targets, minlength=num_classes)
    assert counts.min() >= SMALL_TRAIN // num_classes - 1 and counts.max() <= SMALL_TRAIN // num_classes + 1
    # normalized: roughly zero mean / unit scale, and not saturated
    assert abs(float(train.images.mean())) < 0.5 and 0.5 < float(train.images.std()) < 2.0
    saturated = ((train.pixels == 0) | (train.pixels == 255)).float().mean()
    assert saturated < 0.05


def test_synthetic_is_deterministic_per_seed():
    a_train, a_val, _ = _small_synthetic(seed=3)
    b_train, b_val, _ = _small_synthetic(seed=3)
    c_train, _, _ = _small_synthetic(seed=4)
    assert torch.equal(a_train.images, b_train.images) and a_train.targets == b_train.targets
    assert torch.equal(a_val.images, b_val.images) and a_val.targets == b_val.targets
    assert not torch.equal(a_train.images, c_train.images)
    # train and val are different draws
    assert not torch.equal(a_train.images[:SMALL_VAL], a_val.images)


def test_synthetic_identical_in_another_process():
    train, _, _ = _small_synthetic(seed=5)
    code = (
        "import hashlib; from dyrep_ray.data import build_datasets; "
        f"t,_,_=build_datasets('synthetic', seed=5, synthetic_train_size={SMALL_TRAIN}, "
        f"synthetic_val_size={SMALL_VAL}); print(hashlib.sha256(t.images.numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import hashlib

    assert out.stdout.strip() == hashlib.sha256(train.images.numpy().tobytes()).hexdigest()


def test_synthetic_other_image_size_and_normalization_override():
    train, _, _ = _small_synthetic(image_size=48)
    assert train[0][0].shape == (3, 48, 48)
    plain, _, _ = _small_synthetic()
    custom, _, _ = build_datasets(
        "synthetic",
        synthetic_train_size=SMALL_TRAIN,
        synthetic_val_size=SMALL_VAL,
        aug={"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)},
    )
    torch.testing.assert_close(custom.images, plain.pixels.permute(0, 3, 1, 2).float() / 255)


def test_synthetic_is_picklable_and_loads_with_workers():
    train, _, _ = _small_synthetic()
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone.images, train.images)
    loader = DataLoader(train, batch_size=64, num_workers=2, shuffle=False)
    images, labels = next(iter(loader))
    assert torch.equal(images, train.images[:64])
    assert labels.tolist() == train.targets[:64]


def test_synthetic_is_learnable_by_small_cnn():
    from dyrep_ray.models import build_model

    torch.manual_seed(0)
    # 1024 train images x 3 epochs: ~55% val top-1 (2048 x 5 epochs, the demo setting, reaches ~80%)
    train, val, num_classes = build_datasets("synthetic", seed=0, synthetic_train_size=1024)
    model = build_model("small_cnn", num_classes)
    epochs = 3
    loader = DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        predictions = model(val.images).argmax(dim=1)
    accuracy = (predictions == val.labels).float().mean().item()
    assert accuracy > 0.3, f"val top-1 {accuracy:.3f} is not well above chance (0.1)"


# ---------------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------------


def _dump(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _rows(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, CIFAR_ROW), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6, protocol: int = pickle.HIGHEST_PROTOCOL) -> dict:
    rng = np.random.default_rng(0)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    train_data, train_labels = [], []
    for index in range(1, 6):
        data = _rows(rng, per_batch)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _dump(directory / f"data_batch_{index}", {b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol)
        train_data.append(data)
        train_labels += labels
    test_data = _rows(rng, test)
    test_labels = [int(x) for x in rng.integers(0, 10, test)]
    _dump(directory / "test_batch", {b"data": test_data, b"labels": test_labels}, protocol)
    names = [f"name{i}".encode() for i in range(10)]
    _dump(directory / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch}, protocol)
    return {
        "dir": directory,
        "train_data": np.concatenate(train_data),
        "train_labels": train_labels,
        "test_data": test_data,
        "test_labels": test_labels,
    }


def write_cifar100(root: Path, train: int = 8, test: int = 4) -> Path:
    rng = np.random.default_rng(1)
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        fine = [int(x) for x in rng.integers(0, 100, count)]
        coarse = [x // 5 for x in fine]
        _dump(directory / split, {b"data": _rows(rng, count), b"fine_labels": fine, b"coarse_labels": coarse})
    _dump(
        directory / "meta",
        {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"c{i}".encode() for i in range(20)]},
    )
    return directory


def _py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the real CIFAR files were (Python 2 cPickle, protocol 2, py2 ``str``)."""

    def text(raw: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(raw)]) + raw

    def ints(values) -> bytes:  # BININT each
        return b"".join(b"J" + struct.pack("<i", value) for value in values)

    rows, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + text(b"b") + b"\x87R"
        + b"(K\x01" + ints([rows, width]) + b"\x86"
        + b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + text(b"|") + b"NNN" + ints([-1, -1]) + b"K\x00tb"
        + b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    )
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + b"](" + ints(labels) + b"eu."


def test_cifar_reads_python2_pickles(tmp_path):
    written = write_cifar10(tmp_path)
    data = np.arange(5 * CIFAR_ROW, dtype=np.int64).astype(np.uint8).reshape(5, CIFAR_ROW)
    (written["dir"] / "test_batch").write_bytes(_py2_batch_pickle(data, [9, 8, 7, 6, 5]))
    _, val, _ = build_datasets("cifar10", str(tmp_path))
    assert val.targets == [9, 8, 7, 6, 5]
    assert np.array_equal(val.data, data.reshape(5, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_standard_layout(tmp_path, protocol):
    written = write_cifar10(tmp_path, protocol=protocol)
    train, val, num_classes = build_datasets("cifar10", str(tmp_path))
    assert num_classes == 10
    assert (len(train), len(val)) == (20, 6)
    assert train.targets == written["train_labels"] and val.targets == written["test_labels"]
    assert train.classes[3] == "name3"
    # val transform: ToTensor + Normalize of the R,G,B planes stored row-major in the 3072 bytes
    image, label = val[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == written["test_labels"][2]
    raw = torch.from_numpy(written["test_data"][2].reshape(3, 32, 32).astype(np.float32) / 255)
    expected = (raw - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(image, expected)
    # train transform: crop/flip/cutout keep the shape
    torch.manual_seed(0)
    train_image, _ = train[0]
    assert train_image.shape == (3, 32, 32)


def test_cifar_accepts_batches_dir_itself_and_cifar100(tmp_path):
    written = write_cifar10(tmp_path / "c10")
    train, _, _ = build_datasets("cifar10", str(written["dir"]))
    assert len(train) == 20
    directory = write_cifar100(tmp_path / "c100")
    for data_dir in (tmp_path / "c100", directory):
        train, val, num_classes = build_datasets("cifar100", str(data_dir), aug={"cutout_length": 0})
        assert num_classes == 100 and (len(train), len(val)) == (8, 4)
        assert all(0 <= t < 100 for t in train.targets)
        assert train[0][0].shape == (3, 32, 32)


def test_cifar_dataset_is_picklable_and_loads_with_workers(tmp_path):
    write_cifar10(tmp_path)
    train, _, _ = build_datasets("cifar10", str(tmp_path), aug={"cutout_length": 16})
    clone = pickle.loads(pickle.dumps(train))
    assert clone.targets == train.targets
    images, labels = next(iter(DataLoader(train, batch_size=8, num_workers=2)))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == train.targets[:8]


def test_cifar_missing_directory_says_where_and_no_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        build_datasets("cifar10", str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "\n" not in message
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "no download" in message
    with pytest.raises(DatasetError, match="data_dir is required"):
        build_datasets("cifar100")


def test_cifar_missing_file_is_named(tmp_path):
    written = write_cifar10(tmp_path)
    (written["dir"] / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing file .*data_batch_3"):
        build_datasets("cifar10", str(tmp_path))


@pytest.mark.parametrize(
    "payload, match",
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "expected uint8"),
        ({b"data": np.zeros((2, CIFAR_ROW), np.float32), b"labels": [0, 1]}, "expected uint8"),
        ({b"data": np.zeros((2, CIFAR_ROW), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, CIFAR_ROW), np.uint8), b"labels": [0, 10]}, "outside"),
        ({b"labels": [0, 1]}, "lacks b'data'"),
        ([1, 2, 3], "not a dict"),
    ],
)
def test_cifar_malformed_batch_gives_dataset_error(tmp_path, payload, match):
    written = write_cifar10(tmp_path)
    _dump(written["dir"] / "data_batch_1", payload)
    with pytest.raises(DatasetError, match=match) as info:
        build_datasets("cifar10", str(tmp_path))
    assert "data_batch_1" in str(info.value) and "\n" not in str(info.value)


def test_cifar_garbage_file_gives_dataset_error(tmp_path):
    written = write_cifar10(tmp_path)
    (written["dir"] / "test_batch").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch"):
        build_datasets("cifar10", str(tmp_path))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload_type", [_SystemPayload, _OpenPayload])
@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
def test_cifar_malicious_pickle_is_refused(tmp_path, payload_type, target):
    written = write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    _dump(written["dir"] / target, {b"data": payload_type(marker), b"labels": [0], b"label_names": []})
    with pytest.raises(DatasetError, match="refus") as info:
        build_datasets("cifar10", str(tmp_path / "data"))
    assert not marker.exists()
    assert target in str(info.value)
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(written["dir"] / target)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, classes=("ant", "bee"), per_class: int = 3, side: int = 40) -> None:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name in classes:
            directory = root / split / name
            directory.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, size=(side, side + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(directory / f"{index}.png")


def test_image_folder_builds_train_and_val(tmp_path):
    write_image_folder(tmp_path)
    train, val, num_classes = build_datasets(
        "imagenet", str(tmp_path), image_size=32, aug={"aa": "rand-m9-mstd0.5", "reprob": 0.25, "remode": "pixel"}
    )
    assert num_classes == 2 and (len(train), len(val)) == (6, 6)
    assert train.classes == ["ant", "bee"]
    torch.manual_seed(0)
    image, label = train[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    val_image, val_label = val[0]
    assert val_image.shape == (3, 32, 32) and val_label == 0


def test_image_folder_missing_dirs(tmp_path):
    with pytest.raises(DatasetError, match="missing directory .*train.*no download"):
        build_datasets("imagenet", str(tmp_path))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        build_datasets("imagenet", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# config errors, Cutout
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_dataset_and_aug_key():
    with pytest.raises(DatasetError, match="did you mean 'cifar10'"):
        build_datasets("cifar-10")
    with pytest.raises(DatasetError, match="unknown aug key"):
        build_datasets("synthetic", aug={"cutout": 16})
    with pytest.raises(DatasetError, match="interpolation"):
        build_datasets("synthetic", aug={"interpolation": "lanczos9"})


def test_cutout_zeros_one_square_and_keeps_input():
    torch.manual_seed(0)
    image = torch.ones(3, 32, 32)
    out = Cutout(8)(image)
    assert torch.equal(image, torch.ones(3, 32, 32))
    zeros = (out == 0).all(dim=0)
    count = int(zeros.sum())
    assert 0 < count <= 64
    rows, cols = zeros.nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == count  # one rectangle
    assert torch.equal(Cutout(0)(image), image)


# ---------------------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------------------


def test_parquet_export_synthetic_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, val, _ = _small_synthetic()
    paths = export_parquet(
        "synthetic", None, tmp_path, split="val", rows_per_shard=30,
        synthetic_train_size=SMALL_TRAIN, synthetic_val_size=SMALL_VAL,
    )
    assert [p.name for p in paths] == ["val-00000.parquet", "val-00001.parquet", "val-00002.parquet"]
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    assert table.num_rows == SMALL_VAL
    assert table.schema.field(LABEL_COLUMN).type == "int64"
    assert table.column(LABEL_COLUMN).to_pylist() == val.targets
    images = table.column(IMAGE_COLUMN).to_pylist()
    for index in (0, 17, SMALL_VAL - 1):
        assert np.array_equal(np.asarray(decode_image(images[index])), val.pixels[index].numpy())
    metadata = read_parquet_metadata(tmp_path)
    assert metadata["dataset"] == "synthetic" and metadata["num_classes"] == 10 and metadata["split"] == "val"
    # the decoder reproduces the in-memory tensors exactly
    batch = {IMAGE_COLUMN: np.array(images[:8], dtype=object), LABEL_COLUMN: np.array(val.targets[:8])}
    decoded, labels = build_batch_decoder("synthetic", train=False)(batch)
    assert decoded.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(decoded, val.images[:8], rtol=0, atol=1e-6)
    assert labels.tolist() == val.targets[:8]
    # existing shards are protected
    with pytest.raises(DatasetError, match="overwrite"):
        export_parquet("synthetic", None, tmp_path, split="val", synthetic_val_size=SMALL_VAL)
    again = export_parquet("synthetic", None, tmp_path, split="val", synthetic_val_size=SMALL_VAL, overwrite=True)
    assert len(again) == 1 and not (tmp_path / "val-00002.parquet").exists()


def test_parquet_export_cifar_and_image_folder(tmp_path):
    written = write_cifar10(tmp_path / "cifar")
    paths = export_parquet("cifar10", tmp_path / "cifar", tmp_path / "pq", split="train", rows_per_shard=7)
    assert len(paths) == 3
    dataset = ParquetImageDataset(tmp_path / "pq")
    assert len(dataset) == 20 and dataset.targets == written["train_labels"]
    expected = written["train_data"][11].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(dataset[11][0]), expected)
    decoder = build_batch_decoder("cifar10", train=True)
    images, labels = decoder({IMAGE_COLUMN: np.array(dataset.images[:4], dtype=object),
                              LABEL_COLUMN: np.array(dataset.targets[:4])})
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == written["train_labels"][:4]

    write_image_folder(tmp_path / "folder")
    paths = export_parquet("imagenet", tmp_path / "folder", tmp_path / "pq_folder", split="val")
    folder = ParquetImageDataset(paths[0])
    assert len(folder) == 6 and folder.targets == [0, 0, 0, 1, 1, 1]
    original = sorted((tmp_path / "folder" / "val" / "ant").glob("*.png"))[0].read_bytes()
    assert folder.images[0] == original  # raw file bytes are kept


def test_prepare_command_exports_both_splits(tmp_path, capsys):
    from dyrep_ray.cli import main

    out = tmp_path / "shards"
    code = main(["prepare", "synthetic", "--out", str(out), "--synthetic-train-size", "40",
                 "--synthetic-val-size", "20", "--rows-per-shard", "25"])
    assert code == 0
    # One split per directory: <out>/train and <out>/val, never mixed.
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train-00000.parquet", "train-00001.parquet"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["val-00000.parquet"]
    assert len(ParquetImageDataset(out / "val" / "val-00000.parquet")) == 20
    assert "2 shard(s)" in capsys.readouterr().out
    missing = tmp_path / "missing_out"
    assert main(["prepare", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(missing)]) == 2
    assert "no download" in capsys.readouterr().err
    assert not missing.exists()
