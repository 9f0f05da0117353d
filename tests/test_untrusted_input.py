"""Untrusted input (run directories, data, checkpoints, sweeps): each case with real files and, where it
matters, real processes."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dyrep_ray.engine.checkpoint import (
    CheckpointError,
    load_checkpoint_dir,
    load_state_file,
    write_checkpoint_dir,
)
from dyrep_ray.engine.context import LocalContext, load_newest_valid
from dyrep_ray.errors import UserError
from dyrep_ray.rundir.checkpoints import list_checkpoints
from dyrep_ray.rundir.layout import LEASE_FILE, LOCK_FILE
from dyrep_ray.rundir.lock import (
    RunDirError,
    RunLock,
    RunLockedError,
    check_run_dir,
    open_run_dir,
    validate_run_name,
)
from dyrep_ray.rundir.storage import RunStorage

REPO = Path(__file__).resolve().parents[1]
EMPTY_GRAPH = {"version": 1, "blocks": []}


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dyrep_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO)


def _write_ckpt(run: Path, name: str, epoch: int, top1: float = 0.0, state=None, graph=None) -> Path:
    state = state if state is not None else {"model": {"fc.weight": torch.full((2, 2), float(epoch))}}
    return write_checkpoint_dir(run / name, state=state, graph=graph or EMPTY_GRAPH,
                                meta={"epoch": epoch, "global_step": epoch * 10, "metrics": {"val_top1": top1}})


def _remanifest(directory: Path) -> None:
    """Rewrite MANIFEST.json for the files as they are now (content broken, manifest passing)."""
    from dyrep_ray.engine.checkpoint import sha256_file

    files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
             for n in ("state.pt", "meta.json", "structure.json")}
    (directory / "MANIFEST.json").write_text(json.dumps({"format_version": 1, "files": files}))


# ------------------------------------------------------------------ 1. checkpoint selection and pruning
def test_newest_checkpoint_by_recorded_epoch_not_by_name(tmp_path):
    run = tmp_path / "run"
    _write_ckpt(run, "checkpoint_epoch9999", 9999)
    _write_ckpt(run, "checkpoint_epoch10000", 10000)
    # A user's copy of an old checkpoint sorts after every checkpoint_epochNNNN by name: it must be ignored.
    shutil.copytree(_write_ckpt(tmp_path / "elsewhere", "x", 3), run / "checkpoint_saved_best")
    storage = RunStorage(str(tmp_path), "run")
    assert [e.name for e in list_checkpoints(storage)] == ["checkpoint_epoch10000", "checkpoint_epoch9999"]
    newest = load_newest_valid(storage)
    assert newest.meta["epoch"] == 10000


def test_mid_epoch_names_and_unreadable_meta_count_as_corrupt(tmp_path):
    run = tmp_path / "run"
    _write_ckpt(run, "checkpoint_epoch0003", 3)
    _write_ckpt(run, "checkpoint_epoch0003_step000120", 3)  # recorded step 30 == epoch 3's: tie broken by name
    broken = _write_ckpt(run, "checkpoint_epoch0004", 4)
    (broken / "meta.json").write_text('{"epoch": "four"')
    storage = RunStorage(str(tmp_path), "run")
    entries = list_checkpoints(storage)
    assert entries[0].name == "checkpoint_epoch0004" and not entries[0].meta_ok  # ordered by its name's number
    assert entries[1].name == "checkpoint_epoch0003_step000120"
    assert load_newest_valid(storage).path.name == "checkpoint_epoch0003_step000120"


def test_prune_never_deletes_foreign_dirs_and_keeps_newest(tmp_path):
    run = tmp_path / "run"
    for epoch, top1 in ((1, 90.0), (2, 10.0), (3, 20.0)):
        _write_ckpt(run, f"checkpoint_epoch{epoch:04d}", epoch, top1)
    shutil.copytree(run / "checkpoint_epoch0001", run / "checkpoint_saved_best")
    ctx = LocalContext(torch.device("cpu"), RunStorage(str(tmp_path), "run"), keep_checkpoints=1)
    ctx.report({}, 10000, lambda path: _write_ckpt(path.parent, path.name, 10000, 5.0))
    names = sorted(p.name for p in run.iterdir())
    # best by val_top1 (epoch 1) + the newest (epoch 10000, lowest score); the user's copy untouched.
    assert names == ["checkpoint_epoch0001", "checkpoint_epoch10000", "checkpoint_saved_best"]


def test_plain_params_from_newest_recorded_checkpoint_not_by_name(tmp_path):
    from dyrep_ray.rundir.files import plain_params_from

    run = tmp_path / "run"
    for name, epoch, params in [("checkpoint_epoch9999", 9999, 1), ("checkpoint_epoch10000", 10000, 2),
                                ("checkpoint_saved_best", 10001, 3)]:
        write_checkpoint_dir(run / name, state={"model": {}}, graph=EMPTY_GRAPH,
                             meta={"epoch": epoch, "global_step": epoch, "plain_params": params})
    assert plain_params_from(RunStorage(str(tmp_path), "run")) == 2  # by name it was 1, or the user's copy's 3
    assert plain_params_from(RunStorage(str(tmp_path), "none")) is None


# ------------------------------------------------------------------ 2. run-directory lock (two processes)
HOLD_LOCK = """
import sys, time
from dyrep_ray.rundir.lock import RunLock
from dyrep_ray.rundir.storage import RunStorage
lock = RunLock(RunStorage(sys.argv[1], sys.argv[2])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_with_one_line_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "exp"], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(RunStorage(str(tmp_path), "exp")).acquire()
        proc = _cli("train", "--local", "--output", str(tmp_path), "--name", "exp", "--set", "epochs=1")
        assert proc.returncode == 2
        err = [line for line in proc.stderr.splitlines() if line.startswith("dyrep-ray:")]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "another dyrep-ray process" in err[0]
        assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's flock: no stale lock to clean up by hand.
    lock = RunLock(RunStorage(str(tmp_path), "exp")).acquire()
    lock.release()


def test_lease_marker_on_object_storage(monkeypatch):
    """On S3 (the suite's moto server) a second writer is refused while the lease is fresh; a marker not renewed
    for LEASE_STALE_S (a dead writer's) is taken over; release removes only our own marker."""
    from dyrep_ray.rundir import lock as rundir_lock
    from tests.s3server import S3_TEST_ENV, list_keys, moto_version_problem, s3_server

    problem = moto_version_problem()
    if problem:
        pytest.skip(problem)
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    def objects(endpoint):  # pyarrow also writes "dir/" marker keys: only real objects matter here
        return [key for key in list_keys(endpoint, "lease") if not key.endswith("/")]

    with s3_server("lease") as endpoint:
        uri = f"s3://lease/runs?endpoint_override={endpoint}&scheme=http"
        first = RunLock(RunStorage(uri, "exp")).acquire()
        try:
            assert objects(endpoint) == [f"runs/exp/{LEASE_FILE}"]
            marker = json.loads(RunStorage(uri, "exp").read_text(LEASE_FILE))
            assert marker["pid"] == os.getpid() and time.time() - marker["renewed"] < 60
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                RunLock(RunStorage(uri, "exp")).acquire()
        finally:
            first.release()
        assert objects(endpoint) == []  # released: the marker is gone
        # A writer that died long ago: its marker is stale and taken over, and the new owner's token replaces it.
        dead = {"host": "gone", "pid": 1, "started": "2000-01-01T00:00:00", "token": "dead",
                "renewed": time.time() - rundir_lock.LEASE_STALE_S - 1}
        RunStorage(uri, "exp").write_text(LEASE_FILE, json.dumps(dead))
        second = RunLock(RunStorage(uri, "exp")).acquire()
        try:
            assert json.loads(RunStorage(uri, "exp").read_text(LEASE_FILE))["token"] != "dead"
        finally:
            second.release()
        # A fresh foreign marker (another live writer) is never removed by our release.
        RunStorage(uri, "exp").write_text(LEASE_FILE, json.dumps({**dead, "renewed": time.time()}))
        with pytest.raises(RunLockedError, match="host gone pid 1"):
            RunLock(RunStorage(uri, "exp")).acquire()
        assert objects(endpoint) == [f"runs/exp/{LEASE_FILE}"]


# ------------------------------------------------------------------ 3. Parquet splits
def test_prepare_both_writes_one_split_per_dir_and_val_never_defaults_to_train(tmp_path):
    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import ParquetImageDataset, export_parquet, resolve_parquet_splits

    out = tmp_path / "pq"
    proc = _cli("prepare", "synthetic", "--out", str(out), "--synthetic-train-size", "12",
                "--synthetic-val-size", "6")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    # The sibling val dir prepare wrote is derived; from the parent dir both are.
    assert resolve_parquet_splits(str(out / "train"), None)["parquet_val"] == str(out / "val")
    assert resolve_parquet_splits(str(out), None) == {"parquet_train": str(out / "train"),
                                                      "parquet_val": str(out / "val")}
    with pytest.raises(DatasetError, match="same"):
        resolve_parquet_splits(str(out / "train"), str(out / "train"))
    with pytest.raises(DatasetError, match="recorded as split 'val'"):
        resolve_parquet_splits(str(out / "val"), str(out / "train"))
    lonely = tmp_path / "lonely"
    export_parquet("synthetic", None, lonely, split="train", synthetic_train_size=4, synthetic_val_size=2)
    with pytest.raises(DatasetError, match="parquet_val is not set"):
        resolve_parquet_splits(str(lonely), None)
    # A directory with both splits (as the old prepare wrote, or a copy) is refused by the readers.
    shutil.copy(out / "val" / "val-00000.parquet", lonely)
    with pytest.raises(DatasetError, match="mixes shards of different splits"):
        ParquetImageDataset(lonely)
    with pytest.raises(DatasetError, match="one split only"):
        export_parquet("synthetic", None, lonely, split="train", overwrite=True)


def test_val_never_defaults_to_train_in_the_shared_preflight_and_tune_trials(tmp_path):
    """train (distributed) and every sweep trial go through preflight; a trial's config gets the resolved splits."""
    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import export_parquet
    from dyrep_ray.distributed.trainer import preflight
    from dyrep_ray.engine.config import load_config

    lonely = tmp_path / "lonely"
    export_parquet("synthetic", None, lonely, split="train", synthetic_train_size=4, synthetic_val_size=2)
    cfg = load_config(None, ["dataset=parquet", f"parquet_train={lonely}"])
    assert cfg.parquet_val is None
    with pytest.raises(DatasetError, match="parquet_val is not set"):
        preflight(cfg)
    both = tmp_path / "both"
    export_parquet("synthetic", None, both / "train", split="train", synthetic_train_size=4, synthetic_val_size=2)
    export_parquet("synthetic", None, both / "val", split="val", synthetic_train_size=4, synthetic_val_size=2)
    preflight(load_config(None, ["dataset=parquet", f"parquet_train={both}"]))  # prepare's layout: derived
    # A library caller building the torch datasets directly gets the same rules (it used to validate on train).
    from dyrep_ray.engine.data_source import build_map_datasets

    with pytest.raises(DatasetError, match="parquet_val is not set"):
        build_map_datasets(cfg)
    train, val, _ = build_map_datasets(load_config(None, ["dataset=parquet", f"parquet_train={both}"]))
    assert (len(train), len(val)) == (4, 2)


def test_parquet_labels_and_null_images_named_by_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import METADATA_KEY, ParquetImageDataset

    meta = {METADATA_KEY: json.dumps({"dataset": "synthetic", "split": "train", "num_classes": 10}).encode()}

    def shard(name, images, labels, label_type=None):
        label_type = pa.int64() if label_type is None else label_type
        schema = pa.schema([pa.field("image", pa.binary()), pa.field("label", label_type)], metadata=meta)
        path = tmp_path / name
        path.mkdir()
        pq.write_table(pa.table({"image": images, "label": labels}, schema=schema), path / "train-00000.parquet")
        return path

    png = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with pytest.raises(DatasetError, match="row 1: label -1"):
        ParquetImageDataset(shard("neg", [png.getvalue()] * 2, [0, -1]))
    with pytest.raises(DatasetError, match="row 0: label 10"):
        ParquetImageDataset(shard("big", [png.getvalue()], [10]))
    with pytest.raises(DatasetError, match="not integer"):
        ParquetImageDataset(shard("float", [png.getvalue()], [1e30], pa.float64()))
    with pytest.raises(DatasetError, match="row 1: the image is null"):
        ParquetImageDataset(shard("null", [png.getvalue(), None], [0, 1]))
    bad = ParquetImageDataset(shard("trunc", [png.getvalue(), png.getvalue()[:20]], [0, 1]))
    with pytest.raises(DatasetError, match=r"trunc/train-00000.parquet row 1: not a decodable image"):
        bad[1]


# ------------------------------------------------------------------ 4. run names
@pytest.mark.parametrize("name", ["../../x", ".", "..", "a/b", "a\x00b", "tab\there", "x" * 300])
def test_bad_run_names_refused(name):
    with pytest.raises(RunDirError):
        validate_run_name(name)


def test_cli_refuses_traversal_and_foreign_dirs(tmp_path):
    out = tmp_path / "runs"
    proc = _cli("train", "--local", "--output", str(out), "--name", "../escaped", "--set", "epochs=1")
    assert proc.returncode == 2 and "path separator" in proc.stderr
    assert not (tmp_path / "escaped").exists() and not out.exists()
    foreign = out / "photos"
    foreign.mkdir(parents=True)
    (foreign / "config.txt").write_text("mine")
    proc = _cli("train", "--local", "--output", str(out), "--name", "photos", "--set", "epochs=1")
    assert proc.returncode == 2 and "not a dyrep-ray run" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["config.txt"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    proc = _cli("train", "--local", "--output", str(blocker), "--name", "r", "--set", "epochs=1")
    assert proc.returncode == 2 and "cannot create the run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ 6. dtypes and labels
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.bool, torch.complex64])
def test_strict_load_refuses_dtype_mismatch(dtype):
    from dyrep_ray.export.weights import strict_load

    model = torch.nn.Linear(2, 2)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="dtype mismatch"):
        strict_load(model, state, "weights")


def _cifar_dir(tmp_path: Path, labels, data=None) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else np.zeros((len(labels), 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return tmp_path


@pytest.mark.parametrize("labels", [[1e30, 0.0], [0.5, 1.0], [True, False], [-1, 0]])
def test_cifar_labels_must_be_in_range_ints(tmp_path, labels):
    from dyrep_ray.data import DatasetError, load_cifar_split

    with pytest.raises(DatasetError):
        load_cifar_split("cifar10", _cifar_dir(tmp_path, labels), train=True)


# ------------------------------------------------------------------ 7. signed Tune files (--resume unpickles them)
class _TouchMarker:
    """A pickle payload: unpickling it creates ``path`` (what a hostile tuner.pkl would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def secret(tmp_path, monkeypatch):
    path = tmp_path / "home" / "secret"
    monkeypatch.setenv("DYREP_RAY_SECRET_FILE", str(path))
    return path


def _fake_tune_dir(sweep: Path) -> None:
    """The files Ray Tune leaves in <sweep>/tune (names as Ray 2.60 writes them)."""
    tune_dir = sweep / "tune"
    (tune_dir / "t_00000").mkdir(parents=True)
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps({"_tune_config": None}))
    (tune_dir / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (tune_dir / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(pickle.dumps({"iterations": 1}))
    (tune_dir / "t_00000" / "params.pkl").write_bytes(pickle.dumps({"lr": 0.1}))
    (tune_dir / "t_00000" / "result.json").write_text('{"epoch": 1}\n')


def test_sweep_signature_detects_replaced_added_and_foreign_files(tmp_path, secret):
    from dyrep_ray.rundir.layout import SWEEP_SIGNATURE
    from dyrep_ray.tune.signing import SweepSignatureError, sign_sweep, verify_sweep

    sweep, root = tmp_path / "sw", RunStorage(str(tmp_path), "sw")
    _fake_tune_dir(sweep)
    with pytest.raises(SweepSignatureError, match=f"no signature .{SWEEP_SIGNATURE} missing"):
        verify_sweep(root)
    assert not secret.exists()
    assert sign_sweep(root) == 5
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o077 == 0  # created private
    assert secret.read_text() not in (sweep / SWEEP_SIGNATURE).read_text()  # the key never enters the sweep
    verify_sweep(root)  # untouched: passes
    (sweep / "tune" / "t_00000" / "result.json").unlink()
    verify_sweep(root)  # a signed file that is gone is harmless (nothing reads it)

    marker = tmp_path / "pwned"
    original = (sweep / "tune" / "tuner.pkl").read_bytes()
    (sweep / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_TouchMarker(marker)))
    with pytest.raises(SweepSignatureError, match=r"tune/tuner\.pkl changed after it was signed: it was not "
                                                  r"written by this user's dyrep-ray") as err:
        verify_sweep(root)
    assert "\n" not in str(err.value) and not marker.exists()
    (sweep / "tune" / "tuner.pkl").write_bytes(original)
    (sweep / "tune" / "t_00000" / "error.pkl").write_bytes(pickle.dumps(_TouchMarker(marker)))
    with pytest.raises(SweepSignatureError, match=r"t_00000/error\.pkl is not in the signature"):
        verify_sweep(root)
    (sweep / "tune" / "t_00000" / "error.pkl").unlink()

    # A signature list rewritten by someone else (digests of their files) does not carry this user's MAC.
    signed = json.loads((sweep / SWEEP_SIGNATURE).read_text())
    signed["files"]["tuner.pkl"] = "0" * 64
    (sweep / SWEEP_SIGNATURE).write_text(json.dumps(signed))
    with pytest.raises(SweepSignatureError, match="does not verify with this user's key"):
        verify_sweep(root)
    (sweep / SWEEP_SIGNATURE).write_text("\x00\xff binary")
    with pytest.raises(SweepSignatureError, match="malformed"):
        verify_sweep(root)
    # Signed by another user (another key): refused too.
    sign_sweep(root)
    verify_sweep(root)
    secret.write_text("ab" * 32)
    with pytest.raises(SweepSignatureError, match="does not verify with this user's key"):
        verify_sweep(root)
    secret.chmod(0o644)  # a key others can read protects nothing
    with pytest.raises(SweepSignatureError, match="chmod 600"):
        verify_sweep(root)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_TouchMarker(marker)))  # the payload is live: unpickled, it does create the file
    assert marker.exists()


def test_cli_resume_of_tampered_sweep_exits_2_before_unpickling(tmp_path, secret):
    from dyrep_ray.rundir.layout import SWEEP_FILE
    from dyrep_ray.tune.signing import sign_sweep
    from dyrep_ray.tune.spec import load_sweep

    sweep = tmp_path / "sw"
    _fake_tune_dir(sweep)
    (sweep / SWEEP_FILE).write_text(load_sweep(REPO / "experiments" / "tune" / "demo.yaml").to_json())
    sign_sweep(RunStorage(str(tmp_path), "sw"))
    marker = tmp_path / "pwned"
    (sweep / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_TouchMarker(marker)))
    proc = subprocess.run([sys.executable, "-m", "dyrep_ray.cli", "tune", "--resume", "--output", str(tmp_path),
                           "--name", "sw"], capture_output=True, text=True, timeout=120,
                          env={**_env(), "DYREP_RAY_SECRET_FILE": str(secret)}, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("dyrep-ray:")]
    assert len(err) == 1 and "tuner.pkl" in err[0] and "not written by this user's dyrep-ray" in err[0]
    assert not marker.exists() and "Traceback" not in proc.stderr


@pytest.mark.ray
def test_real_sweep_resume_refuses_replaced_tuner_pkl_and_resumes_untouched(errored_sweep, tmp_path):
    """The session's real sweep (``errored_sweep``: a start, then an untouched ``--resume``) was signed, and its
    resume proceeded; a copy of it with a replaced tuner.pkl is refused before anything is unpickled."""
    import pandas as pd

    from dyrep_ray.rundir.layout import SWEEP_SIGNATURE
    from dyrep_ray.tune.signing import SweepSignatureError
    from dyrep_ray.tune.sweep import run_sweep

    after_first = errored_sweep.after_first
    first = pd.read_csv(after_first / "trials.csv")
    assert sorted(first["status"]) == ["completed", "error"]  # the sweep it injects a fault into
    signed = json.loads((after_first / SWEEP_SIGNATURE).read_text())["files"]
    assert "tuner.pkl" in signed and any(f.startswith("experiment_state-") for f in signed)
    assert (after_first / LOCK_FILE).exists()  # the sweep directory had its writer lock

    assert errored_sweep.resumed.returncode == 0, errored_sweep.resumed.stderr[-3000:]  # untouched: it proceeded
    resumed = pd.read_csv(errored_sweep.sweep / "trials.csv")
    assert list(resumed["status"]) == ["completed"] * len(first)
    assert sorted(resumed["trial_id"]) == sorted(first["trial_id"])

    shutil.copytree(errored_sweep.sweep, tmp_path / "sw")  # the signature names files relative to it
    tuner_pkl, marker = tmp_path / "sw" / "tune" / "tuner.pkl", tmp_path / "pwned"
    tuner_pkl.write_bytes(pickle.dumps(_TouchMarker(marker)))
    with pytest.raises(SweepSignatureError, match="tuner.pkl changed after it was signed"):
        run_sweep(None, str(tmp_path), "sw", resume=True, verbose=0)
    assert not marker.exists()


# ------------------------------------------------------------------ 8. memory exhaustion
class _HugeArray:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (1_000_000, 3072), b"B"))


def test_cifar_pickle_declaring_huge_array_refused_before_allocation(tmp_path):
    from dyrep_ray.data import DatasetError, load_cifar_split

    root = _cifar_dir(tmp_path, [0])
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _HugeArray(), b"labels": [0]}, f, protocol=2)
    assert (root / "cifar-10-batches-py" / "data_batch_1").stat().st_size < 300
    with pytest.raises(DatasetError, match="exhaust memory"):
        load_cifar_split("cifar10", root, train=True)


def test_compressed_state_records_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert load_state_file(path)["w"].shape == (1000,)
    with pytest.raises(CheckpointError, match="compressed records"):
        load_state_file(bomb)


def test_structure_geometry_checked_against_tensors_before_building(tmp_path):
    run = tmp_path / "run"
    graph = {"version": 1, "blocks": [{"path": "conv", "type": "dbb", "in_channels": 20000, "out_channels": 20000,
                                       "kernel_size": 3, "stride": 1, "padding": 1, "groups": 1,
                                       "branches": ["kxk"], "orig_bias": False}]}
    directory = _write_ckpt(run, "checkpoint_epoch0001", 1, graph=graph)
    with pytest.raises(CheckpointError, match="matches no tensor"):
        load_checkpoint_dir(directory)


def test_oversized_and_broken_images_named(tmp_path):
    from PIL import Image

    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.imagefolder import MAX_IMAGE_PIXELS, load_image_file

    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    big = tmp_path / "big.png"
    Image.new("1", (side, side)).save(big)  # 1-bit: small file, huge when decoded to RGB
    assert big.stat().st_size < 2_000_000
    with pytest.raises(DatasetError, match="pixel cap"):
        load_image_file(str(big))
    for name, content in (("empty.png", b""), ("text.jpg", b"not an image")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match=name):
            load_image_file(str(tmp_path / name))


def test_image_folder_does_not_follow_symlinks_out_or_loops(tmp_path):
    from PIL import Image

    from dyrep_ray.data.imagefolder import load_image_folder

    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    cls = tmp_path / "data" / "train" / "cat"
    cls.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(cls / "a.png")
    (cls / "leak.png").symlink_to(secret)
    (cls / "loop").symlink_to(cls, target_is_directory=True)
    folder = load_image_folder(tmp_path / "data", "train")
    assert [Path(p).name for p, _ in folder.samples] == ["a.png"]


def test_huge_model_named_in_meta_is_counted_on_meta_device_and_refused(tmp_path):
    from dyrep_ray.models.limits import MAX_MODEL_PARAMS, ModelTooLargeError, check_model_size, meta_param_count

    assert meta_param_count("resnet18", 5_000_000) > MAX_MODEL_PARAMS  # 512 x 5e6 classifier, nothing allocated
    with pytest.raises(ModelTooLargeError, match="resnet18 with 5000000 classes"):
        check_model_size("resnet18", 5_000_000, "test")
    check_model_size("resnet18", 1000, "test")  # an ordinary model passes
    run = tmp_path / "run"
    write_checkpoint_dir(run / "checkpoint_epoch0001", state={"model": {}}, graph=EMPTY_GRAPH,
                         meta={"epoch": 1, "global_step": 1, "num_classes": 1000,
                               "config": {"model": "timm/vit_gigantic_patch14_clip_224", "num_classes": 1000,
                                          "dataset": "imagenet", "data_dir": str(tmp_path)}})
    for command in (["convert", str(run), "--no-eval"], ["eval", str(run)]):
        start = time.monotonic()
        proc = _cli(*command)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = [line for line in proc.stderr.splitlines() if line.startswith("dyrep-ray:")]
        assert len(err) == 1 and "1,844,442,344 parameters" in err[0] and "vit_gigantic" in err[0], proc.stderr
        assert time.monotonic() - start < 90  # a real build of 1.8e9 parameters (7.4 GB) is not what happened


def test_huge_model_is_refused_by_train_local_and_the_library_loaders(tmp_path):
    """``train --local`` (no driver preflight), ``rebuild_trained_model`` and ``load_deployed`` count first too."""
    from dyrep_ray.engine.checkpoint import LoadedCheckpoint
    from dyrep_ray.export.weights import SIDECAR_FORMAT, load_deployed, rebuild_trained_model, sidecar_path
    from dyrep_ray.models.limits import ModelTooLargeError

    huge = "timm/vit_gigantic_patch14_clip_224"
    start = time.monotonic()
    proc = _cli("train", "--local", "--output", str(tmp_path), "--name", "huge", "--set", f"model={huge}",
                "--set", "num_classes=1000", "--set", "synthetic_train_size=8", "--set", "synthetic_val_size=8")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("dyrep-ray:")]
    assert len(err) == 1 and "1,844,442,344 parameters" in err[0], proc.stderr[-2000:]
    assert time.monotonic() - start < 90
    config = {"model": huge, "num_classes": 1000, "dataset": "synthetic"}
    ckpt = LoadedCheckpoint(path=tmp_path / "ck", meta={"epoch": 1, "num_classes": 1000, "config": config},
                            graph=EMPTY_GRAPH, state={"model": {}})
    with pytest.raises(ModelTooLargeError, match="1,844,442,344 parameters"):
        rebuild_trained_model(ckpt)
    weights = tmp_path / "deployed.safetensors"
    weights.write_bytes(b"")
    sidecar_path(weights).write_text(json.dumps({"format": SIDECAR_FORMAT, "architecture": huge, "num_classes": 1000}))
    with pytest.raises(ModelTooLargeError, match="vit_gigantic"):
        load_deployed(weights)


@pytest.mark.parametrize("override, message", [
    ("image_size=20000", "image_size' must be in \\[1, 4096\\]"),
    ("synthetic_train_size=100000000", "synthetic_train_size' must be in"),
    ("num_classes=10000000", "num_classes' must be in"),
    ("synthetic_train_size=5000000", "would take 71.5 GiB of memory"),
])
def test_config_caps_on_what_a_few_bytes_allocate(override, message):
    from dyrep_ray.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _metrics_run(path: Path, records: list[dict], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.json").write_text(json.dumps(config or {"model": "timm/vit_gigantic_patch14_clip_224"}))
    return path


def _epoch(epoch: int, blocks: int, params: int) -> dict:
    return {"epoch": epoch, "val_top1": 10.0 * epoch, "val_loss": 1.0, "train_loss": 1.0, "params": params,
            "n_blocks": blocks, "events": []}


def test_report_reads_json_only_and_survives_bad_trials_and_odd_names(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dyrep_ray.report.render import render_report
    from dyrep_ray.report.runs import load_run

    sweep = tmp_path / "sweep"
    good = _metrics_run(sweep / "t_good", [_epoch(1, 0, 1234), _epoch(2, 1, 1500)])
    # No checkpoint: the plain count comes from the block-free epoch, not from building the (huge) model.
    run = load_run(good)
    assert run.plain_params == 1234 and "epoch 1" in run.plain_params_source
    assert load_run(_metrics_run(tmp_path / "grown", [_epoch(1, 2, 1500)])).plain_params is None  # unknown
    _metrics_run(sweep / "odd $\\frac{x}{$ \x07name", [_epoch(1, 1, 10), _epoch(2, 1, 12)],
                 {"model": "$\\sqrt{$", "dyrep": True})
    (sweep / "t_binary").mkdir()
    (sweep / "t_binary" / "metrics.jsonl").write_bytes(b"\x80\xff\x00binary" * 50)
    _metrics_run(sweep / "t_types", [{"epoch": 1, "val_top1": "high", "params": "many", "n_blocks": [],
                                      "events": "none"}])
    result = render_report(sweep)
    assert result["mode"] == "sweep" and "t_binary" in result["failed"]
    assert {"t_good", "odd $\\frac{x}{$ \x07name"} <= set(result["trials"])
    summary = (sweep / "report" / "summary.md").read_text()
    assert "| t_binary | not reported: ReportError" in summary and "[t_good]" in summary
    odd = result["trials"]["odd $\\frac{x}{$ \x07name"]
    assert all(path.stat().st_size > 1000 for path in odd["files"] if path.suffix == ".png")
    proc = _cli("report", str(tmp_path / "grown"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown (no checkpoint" in (tmp_path / "grown" / "report" / "summary.md").read_text()


# ------------------------------------------------------------------ 9/10. one line instead of tracebacks
def test_manifest_valid_but_broken_content_is_skipped_like_corrupt(tmp_path):
    run = tmp_path / "run"
    _write_ckpt(run, "checkpoint_epoch0001", 1)
    cases = {
        "checkpoint_epoch0002": lambda d: (d / "structure.json").write_text('{"version": 1, "blocks": [{"x": 1}]}'),
        "checkpoint_epoch0003": lambda d: (d / "meta.json").write_text('{"epoch": Infinity, "global_step": 1}'),
        "checkpoint_epoch0004": lambda d: (d / "MANIFEST.json").write_text('{"files": {"state.pt": {"bytes": "1"}}}'),
    }
    for name, breaker in cases.items():
        directory = _write_ckpt(run, name, int(name[-1]))
        breaker(directory)
        if name != "checkpoint_epoch0004":
            _remanifest(directory)
        with pytest.raises(CheckpointError):
            load_checkpoint_dir(directory)
    assert load_newest_valid(RunStorage(str(tmp_path), "run")).meta["epoch"] == 1


DISK_FULL = """
import logging, resource, signal, sys, torch
from pathlib import Path
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.checkpoint import write_checkpoint_dir
from dyrep_ray.rundir.storage import RunStorage
logging.basicConfig(level=logging.ERROR)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a "disk" that fills after 4 KB per file
ctx = LocalContext(torch.device("cpu"), RunStorage(sys.argv[1], "run"))
state = {"model": {"w": torch.zeros(100_000)}}
ctx.report({}, 1, lambda p: write_checkpoint_dir(p, state=state, graph={"version": 1, "blocks": []},
                                                  meta={"epoch": 1, "global_step": 1}))
print("survived", sorted(x.name for x in Path(sys.argv[1], "run").iterdir()))
"""


def test_disk_full_in_torch_save_goes_through_not_written_handler(tmp_path):
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "survived []" in proc.stdout  # no half-written checkpoint, no temp dir left
    assert "NOT written" in proc.stderr and "torch.save failed" in proc.stderr


def test_stale_temp_dirs_removed_on_next_run(tmp_path):
    run = tmp_path / "run"
    _write_ckpt(run, "checkpoint_epoch0001", 1)
    (run / ".checkpoint_epoch0002.tmp-abc123").mkdir()
    (run / ".checkpoint_epoch0002.tmp-abc123" / "state.pt").write_bytes(b"half")
    (run / "metrics.jsonl.tmp-deadbeef").write_text("{")
    (run / "notes.txt").write_text("the user's")
    lock = open_run_dir(RunStorage(str(tmp_path), "run"), "run")
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoint_epoch0001", "notes.txt"]


def test_convert_eval_bad_arguments_one_line(tmp_path):
    run = tmp_path / "run"
    _write_ckpt(run, "checkpoint_epoch0001", 1)
    for args, needle in ((["convert", str(run), "--batch-size", "-1"], "--batch-size"),
                         (["eval", str(run), "--device", "foo"], "unknown device")):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_every_run_dir_error_is_a_user_error():
    assert issubclass(RunLockedError, UserError) and issubclass(RunDirError, UserError)
    check_run_dir(RunStorage("/nonexistent-dyrep-test", "x"))  # a missing dir is fine: it will be created


# ------------------------------------------------------------------ 11. a dead local Ray head
def test_stale_ray_address_file_detected_in_seconds(tmp_path, monkeypatch):
    import socket

    from dyrep_ray.distributed.ray_local import recorded_local_cluster, stale_local_cluster

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert stale_local_cluster() is None and recorded_local_cluster() is None  # no address file: nothing to say
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("not an address\n")
    assert stale_local_cluster() is None and recorded_local_cluster() is None
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    start = time.monotonic()
    found = stale_local_cluster()
    assert found == (tmp_path / "ray" / "ray_current_cluster", f"127.0.0.1:{port}")
    assert recorded_local_cluster() == f"127.0.0.1:{port}"
    assert time.monotonic() - start < 5
    with socket.socket() as listener:  # a live head answers: not stale
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{listener.getsockname()[1]}")
        assert stale_local_cluster() is None
