"""Hostile and careless inputs: run and sweep directories, outputs and data someone else controls.

Each case with real files, real sockets and real processes where it matters; no Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dyrep_ray.rundir.layout import LOCK_FILE, TENSORBOARD_DIR, TRACKING_FILE, TRAIN_LOG
from dyrep_ray.rundir.lock import RunDirError, RunLock, open_run_dir
from dyrep_ray.rundir.storage import RunStorage
from tests.helpers import run_local

REPO = Path(__file__).resolve().parents[1]
TINY = ["synthetic_train_size=32", "synthetic_val_size=16", "batch_size=16", "epochs=1", "dyrep_recal_bn_iters=1"]


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dyrep_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture()
def victim(tmp_path):
    """A file and a directory outside the run directory, and a path that must never come to exist."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("SECRET\n")
    (outside / "dir").mkdir()
    return outside


def _outside_untouched(outside: Path) -> None:
    assert (outside / "victim.txt").read_text() == "SECRET\n"
    assert sorted(p.name for p in outside.iterdir()) == ["dir", "victim.txt"]  # no missing target created
    assert list((outside / "dir").iterdir()) == []


# --------------------------------------------------------------------------------------------- symlinks
@pytest.mark.parametrize("entry, target", [
    (LOCK_FILE, "victim.txt"), (LOCK_FILE, "missing.txt"), (TRAIN_LOG, "victim.txt"), (TRAIN_LOG, "missing.txt"),
    (TENSORBOARD_DIR, "dir"), ("checkpoint_epoch0001", "dir"), ("structure.json", "victim.txt"),
    ("report", "dir"), ("deployed.safetensors", "missing.txt"), (f"{TENSORBOARD_DIR}/events.out", "victim.txt"),
])
def test_symlink_in_run_or_sweep_dir_refused_before_a_byte_is_written(tmp_path, victim, entry, target):
    for what in ("run", "sweep"):
        run = tmp_path / "runs" / f"lk-{what}"
        (run / entry).parent.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("")  # an earlier run of ours
        os.symlink(victim / target, run / entry)
        with pytest.raises(RunDirError, match="symbolic link"):
            if what == "run":
                open_run_dir(RunStorage(str(tmp_path / "runs"), run.name), run.name)
            else:
                RunLock(RunStorage(str(tmp_path / "runs"), run.name), "sweep").acquire()
        assert not (run / LOCK_FILE).exists() or (run / LOCK_FILE).is_symlink()
    _outside_untouched(victim)


def test_train_refuses_a_symlinked_lock_file_with_one_line(tmp_path, victim):
    run = tmp_path / "runs" / "lk"
    run.mkdir(parents=True)
    os.symlink(victim / "victim.txt", run / LOCK_FILE)
    done = _cli("train", "--local", "--cpu", "--output", str(tmp_path / "runs"), "--name", "lk", *sum(
        (["--set", o] for o in TINY), []))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "symbolic link" in done.stderr, done.stderr
    _outside_untouched(victim)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside it


def test_a_users_config_json_does_not_make_a_run_directory(tmp_path):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text('{"theme": "dark"}')
    (mine / "structure.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="not a dyrep-ray run"):
        open_run_dir(RunStorage(str(tmp_path / "runs"), "mine"), "mine")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "structure.json"]
    assert (mine / "config.json").read_text() == '{"theme": "dark"}'
    # A run killed before its first epoch left only its own config.json (and the lock): still ours.
    ours = tmp_path / "runs" / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"model": "small_cnn", "dyrep": True}))
    open_run_dir(RunStorage(str(tmp_path / "runs"), "ours"), "ours").release()


def test_run_dir_itself_may_be_a_symlink(tmp_path):
    """``--output`` on another disk through a link stays allowed: only links inside the directory are refused."""
    (tmp_path / "disk" / "lk").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "disk" / "lk", tmp_path / "runs" / "lk")
    open_run_dir(RunStorage(str(tmp_path / "runs"), "lk"), "lk").release()


def test_lock_file_opened_without_following_a_late_link(tmp_path, victim, monkeypatch):
    """A link planted between the scan and the open is not followed either (O_NOFOLLOW)."""
    from dyrep_ray.rundir import lock as lock_module

    run = tmp_path / "runs" / "lk"
    run.mkdir(parents=True)

    def plant_after_scan(root, what="run"):
        os.symlink(victim / "victim.txt", run / LOCK_FILE)

    monkeypatch.setattr(lock_module, "refuse_symlinks", plant_after_scan)
    with pytest.raises(RunDirError, match="cannot create"):
        RunLock(RunStorage(str(tmp_path / "runs"), "lk")).acquire()
    _outside_untouched(victim)


# ------------------------------------------------------------------------------------------ outputs
def test_output_paths_that_are_not_regular_files_are_refused(tmp_path):
    from dyrep_ray.rundir.lock import check_output_file

    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for name, kind in (("fifo", "a FIFO"), ("link", "a symbolic link"), ("dir", "a directory")):
        with pytest.raises(RunDirError, match=kind):
            check_output_file(tmp_path / name, "--out")
    with pytest.raises(RunDirError, match="a device node"):
        check_output_file("/dev/full", "--out")
    check_output_file(tmp_path / "file", "--out")  # a regular file is replaced, a new path created
    check_output_file(tmp_path / "new", "--out")
    assert not (tmp_path / "nowhere").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    run_local(run_dir, TINY)
    return run_dir


def _convert(*args):
    from dyrep_ray import cli

    return cli.main(["convert", *map(str, args), "--no-eval", "--no-progress"])


def test_convert_refuses_special_outputs_before_writing_anything(tiny_run, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere.safetensors", tmp_path / "link.safetensors")
    (tmp_path / "ts").mkdir()
    out = tmp_path / "w.safetensors"
    for args, what in (((tiny_run, "--out", tmp_path / "fifo"), "FIFO"),
                       ((tiny_run, "--out", tmp_path / "link.safetensors"), "symbolic link"),
                       ((tiny_run, "--out", out, "--torchscript", tmp_path / "ts"), "--torchscript")):
        assert _convert(*args) == 2
        err = capsys.readouterr().err
        assert what in err and err.strip().count("\n") == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.safetensors", "ts"]  # nothing written
    assert (tmp_path / "fifo").exists() and not (tmp_path / "fifo").is_file()
    assert not (tmp_path / "nowhere.safetensors").exists() and list((tmp_path / "ts").iterdir()) == []


class _Listener:
    """A real TCP server socket that records every connection made to it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_convert_contacts_no_address_from_the_run_directory(tiny_run, tmp_path, caplog):
    import shutil

    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    listener = _Listener()
    store = tmp_path / "elsewhere" / "store"
    try:
        for uri in (f"http://127.0.0.1:{listener.port}", store.as_uri()):
            (run / TRACKING_FILE).write_text(json.dumps(
                {"mlflow": {"tracking_uri": uri, "experiment_id": "1", "run_id": "0" * 32}}))
            assert _convert(run, "--out", tmp_path / "w.safetensors") == 0
            assert listener.connections == 0 and not (tmp_path / "elsewhere").exists()
            assert "pass --mlflow-tracking-uri" in caplog.text
            caplog.clear()
        # The user asks: only then is the store contacted (the listener sees it: the check above can fail).
        assert _convert(run, "--out", tmp_path / "w.safetensors",
                        "--mlflow-tracking-uri", f"http://127.0.0.1:{listener.port}") == 0
        assert listener.connections >= 1
    finally:
        listener.close()
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------------------- Parquet
def _shard(directory: Path, split: str, images, labels, info: dict, image_type=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dyrep_ray.data.parquet import METADATA_KEY

    schema = pa.schema([pa.field("image", image_type or pa.binary()), pa.field("label", pa.int64())],
                       metadata={METADATA_KEY: json.dumps({"split": split, **info}).encode()})
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": labels}, schema=schema), directory / f"{split}-00000.parquet")
    return directory


def _png(side: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


SYNTH = {"dataset": "synthetic", "num_classes": 10, "image_size": 32}


def test_relative_parquet_paths_are_made_absolute_and_a_missing_train_named(tmp_path, monkeypatch):
    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import resolve_parquet_splits

    _shard(tmp_path / "pq" / "train", "train", [_png(32)], [0], SYNTH)
    _shard(tmp_path / "pq" / "val", "val", [_png(32)], [0], SYNTH)
    monkeypatch.chdir(tmp_path)
    # Ray workers run in other directories: what the driver passes on must not depend on its cwd.
    assert resolve_parquet_splits("pq/train", "pq/val") == {"parquet_train": str(tmp_path / "pq" / "train"),
                                                           "parquet_val": str(tmp_path / "pq" / "val")}
    assert resolve_parquet_splits("pq", None)["parquet_val"] == str(tmp_path / "pq" / "val")
    with pytest.raises(DatasetError, match=r"^parquet_train nope/train does not exist"):
        resolve_parquet_splits("nope/train", None)


def test_empty_parquet_sets_refused(tmp_path):
    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import resolve_parquet_splits

    full_train = _shard(tmp_path / "a" / "train", "train", [_png(32)], [0], SYNTH)
    empty_val = _shard(tmp_path / "a" / "val", "val", [], [], SYNTH)
    empty_train = _shard(tmp_path / "b" / "train", "train", [], [], SYNTH)
    full_val = _shard(tmp_path / "b" / "val", "val", [_png(32)], [0], SYNTH)
    with pytest.raises(DatasetError, match="parquet_val .* holds no rows"):
        resolve_parquet_splits(str(full_train), str(empty_val))
    with pytest.raises(DatasetError, match="parquet_train .* holds no rows"):
        resolve_parquet_splits(str(empty_train), str(full_val))


def test_parquet_image_column_of_wrong_type_and_huge_num_classes_refused(tmp_path):
    import pyarrow as pa

    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import ParquetImageDataset, read_parquet_metadata, resolve_parquet_splits
    from dyrep_ray.limits import MAX_NUM_CLASSES

    ints = _shard(tmp_path / "ints" / "train", "train", [1, 2], [0, 1], SYNTH, image_type=pa.int64())
    val = _shard(tmp_path / "ints" / "val", "val", [_png(32)], [0], SYNTH)
    for call in (lambda: ParquetImageDataset(ints), lambda: resolve_parquet_splits(str(ints), str(val))):
        with pytest.raises(DatasetError, match=r"column 'image' is int64, not binary"):
            call()
    huge = _shard(tmp_path / "huge", "train", [_png(32)], [0], {**SYNTH, "num_classes": MAX_NUM_CLASSES + 1})
    with pytest.raises(DatasetError, match=rf"num_classes must be an integer in \[1, {MAX_NUM_CLASSES}\]"):
        read_parquet_metadata(huge)


def test_an_oversized_image_in_a_fixed_size_set_is_named_by_row(tmp_path):
    from dyrep_ray.data import DatasetError
    from dyrep_ray.data.parquet import ParquetImageDataset
    from dyrep_ray.distributed.ray_data import DecodeAugment

    path = _shard(tmp_path / "pq", "train", [_png(32), _png(600)], [0, 1], SYNTH)
    data = ParquetImageDataset(path)
    assert data[0][1] == 0
    with pytest.raises(DatasetError, match=r"train-00000.parquet row 1: image is 600x600 pixels but the set's "
                                           r"metadata records 32x32"):
        data[1]
    decode = DecodeAugment("synthetic", train=False, image_size=32, image_side=32)  # the Ray Data path
    with pytest.raises(DatasetError, match=r"row 1: image is 600x600"):
        decode({"image": [_png(32), _png(600)], "label": [0, 1], "path": [str(path / "train-00000.parquet")] * 2})


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, message", [
    ("batch_size=99999999999999999999", r"'batch_size' must be <= 2147483647"),
    ("batch_size=100000", r"'batch_size' must be <= 65536 images per worker"),
    ("val_batch_size=100000", r"'val_batch_size' must be <= 65536 images per worker"),
    ("epochs=99999999999999999999", r"'epochs' must be <= 2147483647"),
    ("seed=99999999999999999999", r"'seed' must be <= 2147483647"),
    ("workers=[1, 99999999999999999999]", r"'workers'"),
])
def test_huge_integers_refused_in_one_line(override, message):
    from dyrep_ray.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_original_format_multiplier_overflow_is_one_line():
    from dyrep_ray.engine.config import ConfigError
    from dyrep_ray.engine.original_format import translate_original

    with pytest.raises(ConfigError, match="val_batch_size_multiplier' 1e\\+308 x batch_size 64 is not a usable"):
        translate_original({"batch_size": 64, "val_batch_size_multiplier": 1.0e308})
    assert translate_original({"batch_size": 64, "val_batch_size_multiplier": 2})["val_batch_size"] == 128


def test_huge_batch_size_leaves_no_run_dir(tmp_path):
    done = _cli("train", "--local", "--cpu", "--output", str(tmp_path / "runs"), "--name", "big",
                "--set", "batch_size=99999999999999999999")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "batch_size" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ report
def _report_run(path: Path, events) -> Path:
    path.mkdir(parents=True)
    record = {"epoch": 1, "val_top1": 10.0, "val_loss": 1.0, "train_loss": 1.0, "params": 10, "n_blocks": 1,
              "events": events}
    (path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (path / "config.json").write_text(json.dumps({"model": "small_cnn"}))
    return path


def test_report_on_events_that_are_not_a_list_is_one_line(tmp_path):
    run = _report_run(tmp_path / "run", "notalist")
    done = _cli("report", str(run))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "'events' is a str, not a list" in done.stderr, done.stderr


def test_control_characters_from_event_paths_are_escaped_in_the_summary(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dyrep_ray.report.render import render_report

    evil = "features.\x1b[2J\x1b]0;owned\x07.conv\n| fake | row |"
    run = _report_run(tmp_path / "run", [{"op": "grow", "path": evil, "branches": ["1x1", "k\x1bx"]}, "junk"])
    render_report(run)
    summary = (run / "report" / "summary.md").read_text()
    assert not any(ord(ch) < 32 and ch != "\n" or 0x7f <= ord(ch) <= 0x9f for ch in summary)
    assert "features.\\x1b[2J\\x1b]0;owned\\x07.conv\\x0a\\| fake \\| row \\|" in summary
    assert "k\\x1bx" in summary
    assert not any(line.startswith("| fake") for line in summary.splitlines())


# ----------------------------------------------------------------------------------- checkpoint writing
def test_failed_checkpoint_log_tells_the_truth_and_a_rerun_without_one_is_not_silent(tmp_path, caplog):
    import resource

    from dyrep_ray.engine.checkpoint import write_checkpoint_dir
    from dyrep_ray.engine.context import LocalContext, NoCheckpointError, load_newest_valid

    def failing(path):
        raise OSError(27, "File too large")

    def big(path):  # 400 KB of state: over the file size limit below
        write_checkpoint_dir(path, state={"model": {"w": torch.zeros(100_000)}}, graph={"version": 1, "blocks": []},
                             meta={"epoch": 1, "global_step": 1})

    ctx = LocalContext(torch.device("cpu"), tmp_path / "run", 2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, limits[1]))  # ulimit -f (Python ignores SIGXFSZ)
    try:
        with caplog.at_level(logging.ERROR):
            ctx.report({}, 1, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert "checkpoint for epoch 1 NOT written" in caplog.text and "the run has no checkpoint" in caplog.text
    assert "stays valid" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]  # no half-written dir
    with pytest.raises(NoCheckpointError, match=r"no checkpoint of this run could be written \(last: checkpoint "
                                                r"for epoch 1: torch.save failed"):
        ctx.check_resumable()  # the CLI's last step: exit 2, one line
    with caplog.at_level(logging.WARNING):
        assert load_newest_valid(ctx.storage) is None
    assert "records 1 epoch(s) in metrics.jsonl but holds no checkpoint" in caplog.text
    caplog.clear()
    ctx.report({}, 1, lambda path: write_checkpoint_dir(path, state={}, graph={"version": 1, "blocks": []},
                                                        meta={"epoch": 1, "global_step": 1}))
    with caplog.at_level(logging.ERROR):
        ctx.report({}, 2, failing)  # a later failure: the run goes on from the one it has
    assert "checkpoint for epoch 2 NOT written" in caplog.text and "checkpoint_epoch0001 stays" in caplog.text
    ctx.check_resumable()  # one checkpoint exists: exit 0


def test_a_finished_ray_run_without_any_checkpoint_ends_with_one_line(tmp_path):
    """The Ray path's end-of-run check (cli, after the workers finished): epochs recorded, a checkpoint due, none
    in the run directory -> NoCheckpointError (exit 2); not due yet, or one present -> fine."""
    from dyrep_ray.engine.context import NoCheckpointError, require_a_checkpoint
    from dyrep_ray.rundir.storage import as_storage

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    storage = as_storage(run)
    with pytest.raises(NoCheckpointError, match=r"2 epoch\(s\) recorded in metrics.jsonl, no checkpoint directory"):
        require_a_checkpoint(storage, checkpoint_every=1)
    require_a_checkpoint(storage, checkpoint_every=3)  # not due yet
    from dyrep_ray.engine.checkpoint import write_checkpoint_dir

    write_checkpoint_dir(run / "checkpoint_epoch0002", state={}, graph={"version": 1, "blocks": []},
                         meta={"epoch": 2, "global_step": 2})
    require_a_checkpoint(storage, checkpoint_every=1)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_checkpoint_directories_follow_the_umask_like_every_other_directory(tmp_path, umask, mode):
    from dyrep_ray.engine.checkpoint import write_checkpoint_dir

    old = os.umask(umask)
    try:
        path = write_checkpoint_dir(tmp_path / "run" / "checkpoint_epoch0001", state={}, meta={"epoch": 1},
                                    graph={"version": 1, "blocks": []})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, (tmp_path / "run").stat().st_mode & 0o777) == (mode, mode)


# ------------------------------------------------------------------------------------------------- sweeps
def test_a_replaced_sweep_json_is_refused_on_resume(tmp_path, monkeypatch):
    import pickle

    from dyrep_ray.rundir.layout import SWEEP_FILE
    from dyrep_ray.tune.signing import SweepSignatureError, sign_sweep, verify_sweep
    from dyrep_ray.tune.spec import load_sweep

    secret = tmp_path / "home" / "secret"
    monkeypatch.setenv("DYREP_RAY_SECRET_FILE", str(secret))
    sweep, root = tmp_path / "sw", RunStorage(str(tmp_path), "sw")
    (sweep / "tune").mkdir(parents=True)
    (sweep / "tune" / "tuner.pkl").write_bytes(pickle.dumps({"_tune_config": None}))
    spec = json.loads(load_sweep(REPO / "experiments" / "tune" / "demo.yaml").to_json())
    (sweep / SWEEP_FILE).write_text(json.dumps(spec))
    assert sign_sweep(root) == 2  # tuner.pkl and sweep.json
    verify_sweep(root)
    # Someone with write access to the (shared) sweep directory points the resumed trials at their server;
    # `tune --resume` verifies before the tracking environment or Ray start (the CLI's exit 2: test_untrusted_input).
    spec["base_config"]["mlflow_tracking_uri"] = "http://127.0.0.1:9/"
    (sweep / SWEEP_FILE).write_text(json.dumps(spec))
    with pytest.raises(SweepSignatureError, match=r"sw/sweep\.json changed after it was signed"):
        verify_sweep(root)


# ------------------------------------------------------------------------------------- SIGKILL mid-write
KILLED_WRITER = """
import sys, time, torch
from dyrep_ray.engine import checkpoint
from dyrep_ray.engine.context import LocalContext
ctx = LocalContext(torch.device("cpu"), sys.argv[1])
state = {"model": {"w": torch.arange(1000.0)}}
write = lambda epoch: (lambda path: checkpoint.write_checkpoint_dir(
    path, state=state, graph={"version": 1, "blocks": []}, meta={"epoch": epoch, "global_step": epoch}))
ctx.report({}, 1, write(1))
real = checkpoint._write_json
def stall_before_manifest(path, obj):
    if path.name == "MANIFEST.json":
        print("stalled", flush=True)
        time.sleep(600)
    real(path, obj)
checkpoint._write_json = stall_before_manifest
ctx.report({}, 2, write(2))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    import signal

    from dyrep_ray.engine.context import load_newest_valid

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert writer.stdout.readline().strip() == "stalled"  # epoch 2: state, meta, graph written, no manifest
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    left = sorted(p.name for p in run.iterdir())
    assert left[0].startswith(".checkpoint_epoch0002.tmp-") and left[1:] == ["checkpoint_epoch0001"]
    storage = RunStorage(str(tmp_path), "run")
    assert load_newest_valid(storage).meta["epoch"] == 1
    (run / "metrics.jsonl").write_text("")
    open_run_dir(storage, "run").release()  # the next run removes what the killed write left
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoint_epoch0001", "metrics.jsonl"]


# ------------------------------------------------------------------------------------------- object stores
def test_object_store_checkpoint_with_dot_dot_keys_is_skipped_and_nothing_lands_outside(tmp_path, monkeypatch):
    import tempfile

    from dyrep_ray.engine.checkpoint import write_checkpoint_dir
    from dyrep_ray.engine.context import load_newest_valid
    from tests.s3server import S3_TEST_ENV, moto_version_problem, s3_client, s3_server

    if moto_version_problem():
        pytest.skip(moto_version_problem())
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with s3_server("dyrep-hostile") as endpoint:
        storage = RunStorage(f"s3://dyrep-hostile/runs?endpoint_override={endpoint}&scheme=http", "r")
        for epoch in (1, 2):
            storage.write_dir(f"checkpoint_epoch000{epoch}", lambda path, e=epoch: write_checkpoint_dir(
                path, state={"model": {"w": torch.zeros(2)}}, graph={"version": 1, "blocks": []},
                meta={"epoch": e, "global_step": e}))
        escape = str(tmp_path / "ESCAPED").lstrip("/")
        s3_client(endpoint).put_object(Bucket="dyrep-hostile", Key=f"runs/r/checkpoint_epoch0002/{'../' * 12}{escape}",
                                       Body=b"x")
        assert load_newest_valid(storage).meta["epoch"] == 1  # the planted key makes epoch 2 unusable
    assert not (tmp_path / "ESCAPED").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # every temp download removed, the failed one too


def test_ray_data_decode_tasks_never_wait_for_a_cpu_the_workers_hold(monkeypatch):
    """A 2-CPU node with one train worker hung at 0 rows when decode ran in a full-CPU actor next to the worker
    (the read tasks never got a CPU; checked with a real run).  Decode now runs in tasks fused with the read,
    which need one spare CPU; a node whose workers hold every CPU gets 0-CPU tasks, one at a time (the decision
    is tested here without Ray)."""
    import ray

    from dyrep_ray.distributed import ray_data
    from dyrep_ray.distributed.trainer import CPUS_PER_WORKER
    from dyrep_ray.engine.config import load_config

    assert ray_data.TRAIN_WORKER_CPUS == CPUS_PER_WORKER
    def full(tasks):
        return {"cpus_per_task": ray_data.DECODE_CPUS_PER_TASK, "max_tasks": tasks}

    for cpus, workers, pool in ((2, 1, full(1)), (3, 2, full(1)), (4, 2, full(2)), (16, [2, 4], full(8)),
                                (64, 2, full(ray_data.DECODE_MAX_TASKS)),
                                (2, 2, {"cpus_per_task": 0.0, "max_tasks": 1}),
                                (1, 1, {"cpus_per_task": 0.0, "max_tasks": 1})):
        monkeypatch.setattr(ray, "cluster_resources", lambda cpus=cpus: {"CPU": float(cpus)})
        assert ray_data.decode_pool(load_config(None, [f"workers={workers}"])) == pool, (cpus, workers)


def test_report_refuses_a_run_directory_holding_a_symlink(tmp_path, victim):
    run = _report_run(tmp_path / "run", [])
    os.symlink(victim / "dir", run / "report")
    done = _cli("report", str(run))
    assert done.returncode == 2 and "symbolic link" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    _outside_untouched(victim)


def test_ctrl_c_of_a_ray_run_ends_with_the_interrupted_line(tmp_path, monkeypatch, capsys):
    """Ray Train's SIGINT handler aborts the run and calls sys.exit inside fit() (exit 1, no line); the CLI must
    say how to resume instead.  Ray itself is replaced by a trainer whose fit() does what that handler does."""
    from dyrep_ray import cli
    from dyrep_ray.distributed import trainer

    class AbortedBySigint:
        def fit(self):
            raise SystemExit(0)

    monkeypatch.setattr(trainer, "connect", lambda address=None, num_cpus=None: "local")
    monkeypatch.setattr(trainer, "check_resources", lambda cfg, use_gpu: None)
    monkeypatch.setattr(trainer, "build_torch_trainer", lambda cfg, launch, callbacks=(): AbortedBySigint())
    monkeypatch.setattr(trainer, "preflight", lambda cfg: None)
    monkeypatch.setattr(cli, "_train_on_ray", lambda args, cfg, name, storage: trainer.run_distributed(
        cfg, args.output, name))
    rc = cli.main(["train", "--cpu", "--output", str(tmp_path), "--name", "si", *sum((["--set", o] for o in TINY), [])])
    assert rc == 130
    assert "interrupted; re-run the same command" in capsys.readouterr().err
