"""Experiment tracking: TensorBoard and MLflow callbacks on a real --local run, read back with the real readers.

The main fixture is a real run whose Trainer calls the callbacks itself (``Trainer(callbacks=...)``); the failure
and resume cases replay that run's recorded rows through the same hooks.  ``test_ray_run_tracks_from_rank_0_only``
reads what the session's 2-worker Ray reference run tracked (built in each worker, rank 0 only), as
``dyrep-ray train`` does on Ray.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.rundir.layout import METRICS_FILE, STRUCTURE_FILE
from dyrep_ray.tracking import (
    TENSORBOARD_DIR,
    TRACKING_FILE,
    build_tracking_callbacks,
    resolve_tracking_uri,
)
from dyrep_ray.tracking.base import epoch_scalars
from dyrep_ray.tracking.mlflow import (
    MLflowCallback,
    flatten_params,
    log_deployed_artifacts,
)
from dyrep_ray.tracking.tensorboard import TensorBoardCallback

LOCAL_TINY = ["synthetic_train_size=256", "synthetic_val_size=128", "batch_size=32", "dyrep_recal_bn_iters=2",
              "epochs=3", "dyrep_grow_topk=2"]
# The per-epoch scalars the issue names; every one must read back equal to metrics.jsonl.
TRACKED_KEYS = ("train_loss", "val_top1", "val_top5", "val_loss", "lr", "params", "n_blocks", "images_per_s",
                "epoch_time_s")
UNREACHABLE_URI = "http://127.0.0.1:9"  # discard port: closed
FAIL_FAST_S = 10.0
SERVER_START_S = 240  # a cold `mlflow server` start takes 1-2 minutes on a busy 2-core machine


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def read_tensorboard(log_dir: Path) -> tuple[dict, dict]:
    """({scalar tag: {step: value}}, {text tag: {step: text}}) through TensorBoard's own event reader."""
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags["scalars"]}
    texts = {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)} for tag in tags["tensors"]}
    return scalars, texts


def metric_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def download_json(client: MlflowClient, run_id: str, path: str, dest: Path) -> object:
    local = client.download_artifacts(run_id, path, str(dest))
    return json.loads(Path(local).read_text())


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One sqlite store (creating its schema takes seconds) and one file store for the whole module."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"sqlite": f"sqlite:///{root / 'mlflow.db'}", "file": resolve_tracking_uri(str(root / "mlruns"))}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, stores):
    """A real 3-epoch --local run with TensorBoard and two MLflow callbacks (sqlite store and file store)."""
    run_dir = tmp_path_factory.mktemp("tracked") / "tiny-run"
    cfg = load_config(None, LOCAL_TINY)
    callbacks = [TensorBoardCallback(), MLflowCallback(stores["sqlite"]), MLflowCallback(stores["file"])]
    trainer = Trainer.from_config(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints),
                                  callbacks=callbacks)
    summary = trainer.fit()
    assert all(cb.enabled for cb in callbacks)
    return types.SimpleNamespace(run_dir=run_dir, cfg=cfg, trainer=trainer, summary=summary, rows=read_rows(run_dir),
                                 callbacks=callbacks)


def test_tensorboard_scalars_events_and_model_size_read_back(tracked_run):
    run = tracked_run
    scalars, texts = read_tensorboard(run.run_dir / TENSORBOARD_DIR)
    assert [r["epoch"] for r in run.rows] == [1, 2, 3]
    for key in TRACKED_KEYS:
        expected = {r["epoch"]: r[key] for r in run.rows}
        assert scalars[key].keys() == expected.keys(), key
        for step, value in expected.items():
            assert scalars[key][step] == pytest.approx(value, rel=1e-6), (key, step)  # float32 in event files
    assert scalars["model/plain_params"] == {0: run.trainer.plain_params}
    assert scalars["model/plain_macs"][0] == pytest.approx(run.trainer.plain_macs, rel=1e-6)
    # one text entry per adjust (after epochs 1 and 2; none after the last), naming every grow/cut event
    adjust_texts = texts["structure_events/text_summary"]
    adjusted = {r["epoch"]: r["events"] for r in run.rows if r["events"]}
    assert adjusted.keys() == {1, 2} and adjust_texts.keys() == adjusted.keys()
    for epoch, events in adjusted.items():
        for event in events:
            assert f"{event['op']} `{event['path']}`" in adjust_texts[epoch]
    grows = {r["epoch"]: sum(e["op"] == "grow" for e in r["events"]) for r in run.rows}
    assert scalars["structure/grows"] == grows
    assert json.loads(texts["config/text_summary"][0].strip("`\n"))["epochs"] == run.cfg.epochs


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_run_params_metrics_and_artifacts_read_back(tracked_run, stores, store, tmp_path):
    run = tracked_run
    client = MlflowClient(tracking_uri=stores[store])
    info = json.loads((run.run_dir / TRACKING_FILE).read_text())["mlflow"]
    callback = run.callbacks[1 if store == "sqlite" else 2]
    assert callback.run_id is not None
    if store == "file":  # tracking.json holds the last MLflow callback's run (the file store)
        assert info == {"tracking_uri": stores["file"], "experiment_id": info["experiment_id"],
                        "run_id": callback.run_id}
    mlrun = client.get_run(callback.run_id)
    assert mlrun.info.run_name == run.run_dir.name and mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    expected_params = flatten_params(run.cfg.to_dict(), 6000)
    assert {k: params[k] for k in expected_params} == expected_params
    assert int(params["model.plain_params"]) == run.trainer.plain_params
    for key in TRACKED_KEYS:
        assert metric_history(client, callback.run_id, key) == {r["epoch"]: float(r[key]) for r in run.rows}, key
    assert metric_history(client, callback.run_id, "grows") == {
        r["epoch"]: float(sum(e["op"] == "grow" for e in r["events"])) for r in run.rows}
    paths = artifact_paths(client, callback.run_id)
    assert paths >= {"config.json", "structure.json", METRICS_FILE, "structure_events/epoch_0001.json",
                     "structure_events/epoch_0002.json", "structure/epoch_0001.json", "structure/epoch_0002.json"}
    assert "structure_events/epoch_0003.json" not in paths  # no adjust after the last epoch
    final_graph = json.loads((run.run_dir / STRUCTURE_FILE).read_text())
    assert download_json(client, callback.run_id, "structure.json", tmp_path) == final_graph
    # the last adjust (after epoch 2) left the final structure; the first one had only its own grows
    assert download_json(client, callback.run_id, "structure/epoch_0002.json", tmp_path) == final_graph
    first = download_json(client, callback.run_id, "structure/epoch_0001.json", tmp_path)
    first_dbb = {b["path"] for b in first["blocks"] if b["type"] == "dbb"}
    assert first_dbb == {e["path"] for e in run.rows[0]["events"] if e["op"] == "grow"}
    events = download_json(client, callback.run_id, "structure_events/epoch_0002.json", tmp_path)
    assert events == {"epoch": 2, "events": run.rows[1]["events"]}
    assert mlrun.data.metrics["summary.best_top1"] == run.summary["best_top1"]


def test_deployed_artifacts_attach_to_the_runs_mlflow_run(tracked_run, stores, tmp_path):
    from dyrep_ray.export.convert import convert_checkpoint

    run = tracked_run
    result = convert_checkpoint(run.run_dir, tmp_path / "deployed.safetensors", evaluate=False)
    assert log_deployed_artifacts(run.run_dir, result.weights, result.sidecar) is True
    run_id = run.callbacks[2].run_id  # tracking.json names the file-store run
    client = MlflowClient(tracking_uri=stores["file"])
    assert artifact_paths(client, run_id, "deployed") == {"deployed/deployed.safetensors", "deployed/deployed.json"}
    local = client.download_artifacts(run_id, "deployed/deployed.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == result.weights.read_bytes()
    assert log_deployed_artifacts(tmp_path / "no-such-run", result.weights, result.sidecar) is False


def _replay(trainer, callbacks, rows):
    """Call the hooks as the loop does for ``rows`` (metrics.jsonl rows of a real run)."""
    for cb in callbacks:
        cb.on_fit_start(trainer)
    for row in rows:
        for step in range(2):
            for cb in callbacks:
                cb.on_step_end(trainer, row["epoch"] - 1, step, torch.tensor(row["train_loss"]))
        if row["events"]:
            for cb in callbacks:
                cb.on_adjust(trainer, row["epoch"] - 1, row["events"])
        for cb in callbacks:
            cb.on_epoch_end(trainer, row)
            cb.on_checkpoint(trainer, row["epoch"])


def _replay_trainer(tracked_run, run_dir: Path, cfg=None, completed: int = 0, is_main: bool = True):
    ctx = LocalContext(torch.device("cpu"), run_dir)
    if not is_main:
        ctx = types.SimpleNamespace(is_main=False, rank=1, storage=ctx.storage)
    source = tracked_run.trainer
    return types.SimpleNamespace(cfg=cfg or tracked_run.cfg, ctx=ctx, model=source.model,
                                 plain_params=source.plain_params, plain_macs=source.plain_macs,
                                 state=types.SimpleNamespace(epoch=completed))


def test_resumed_run_continues_the_same_mlflow_run_without_duplicates(tracked_run, stores, tmp_path):
    rows = tracked_run.rows
    run_dir = tmp_path / "resumed"
    first = [MLflowCallback(stores["sqlite"]), TensorBoardCallback()]
    _replay(_replay_trainer(tracked_run, run_dir), first, rows[:2])  # killed after epoch 2: no on_fit_end
    run_id = first[0].run_id
    more_epochs = tracked_run.cfg.replace(epochs=4)
    second = [MLflowCallback(stores["sqlite"]), TensorBoardCallback()]
    trainer = _replay_trainer(tracked_run, run_dir, cfg=more_epochs, completed=1)  # resumed from epoch 1
    _replay(trainer, second, rows[1:])
    for cb in second:
        cb.on_fit_end(trainer, {"epochs": 3})
    assert second[0].run_id == run_id
    client = MlflowClient(tracking_uri=stores["sqlite"])
    history = client.get_metric_history(run_id, "val_top1")
    assert sorted(m.step for m in history) == [1, 2, 3]  # epoch 2 was not logged twice
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["epochs"] == str(tracked_run.cfg.epochs)  # params are immutable in MLflow ...
    assert mlrun.data.tags["dyrep_ray.resumed.epochs"] == "4"  # ... the changed value is a tag
    scalars, _ = read_tensorboard(run_dir / TENSORBOARD_DIR)
    # the resumed writer purged the first writer's epoch-2 point, then wrote epochs 2 and 3 again
    assert scalars["val_top1"] == pytest.approx({r["epoch"]: r["val_top1"] for r in rows})


def test_unreachable_uri_and_unwritable_tensorboard_dir_warn_once_and_the_run_goes_on(tracked_run, tmp_path,
                                                                                      caplog):
    import time

    run_dir = tmp_path / "bad-tracking"
    run_dir.mkdir()
    (run_dir / TENSORBOARD_DIR).write_text("a file where the TensorBoard directory should be")
    cfg = tracked_run.cfg.replace(epochs=3)
    callbacks = [TensorBoardCallback(), MLflowCallback(UNREACHABLE_URI)]
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    trainer = _replay_trainer(tracked_run, run_dir, cfg=cfg)
    _replay(trainer, callbacks, tracked_run.rows)
    for cb in callbacks:
        cb.on_fit_end(trainer, tracked_run.summary)
    assert time.monotonic() - started < FAIL_FAST_S
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 2, warnings
    tb_warning, mlflow_warning = warnings
    assert tb_warning.startswith("TensorBoard tracking disabled for this run") and TENSORBOARD_DIR in tb_warning
    assert mlflow_warning.startswith("MLflow tracking disabled for this run") and UNREACHABLE_URI in mlflow_warning
    assert "Connection refused" in mlflow_warning  # the root cause survives the one-line cut
    assert all("\n" not in w for w in warnings)
    assert not any(cb.enabled for cb in callbacks)
    assert not (run_dir / TRACKING_FILE).exists()


def test_backend_failing_mid_run_warns_once_then_stays_off(tracked_run, stores, tmp_path, caplog):
    run_dir = tmp_path / "mid-run"
    callback = MLflowCallback(stores["sqlite"])
    trainer = _replay_trainer(tracked_run, run_dir)
    callback.on_fit_start(trainer)
    client = MlflowClient(tracking_uri=stores["sqlite"])
    client.delete_run(callback.run_id)  # someone deletes the run while training goes on
    caplog.set_level(logging.WARNING)
    for row in tracked_run.rows:
        callback.on_epoch_end(trainer, row)
    callback.on_fit_end(trainer, tracked_run.summary)
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "could not log epoch metrics" in warnings[0], warnings
    assert not callback.enabled and not client.get_metric_history(callback.run_id, "val_top1")


def test_other_ranks_track_nothing(tracked_run, stores, tmp_path, caplog):
    run_dir = tmp_path / "rank1"
    callbacks = [TensorBoardCallback(), MLflowCallback(stores["sqlite"])]
    caplog.set_level(logging.WARNING)
    _replay(_replay_trainer(tracked_run, run_dir, is_main=False), callbacks, tracked_run.rows)
    assert not run_dir.exists() and not tracking_warnings(caplog)


def test_factory_follows_config_and_long_params_respect_mlflow_limits(tracked_run, stores):
    cfg = tracked_run.cfg
    kinds = [type(cb).__name__ for cb in build_tracking_callbacks(cfg, "/tmp/x")]
    assert kinds == ["TensorBoardCallback"]  # mlflow_tracking_uri unset: MLflow off
    with_mlflow = types.SimpleNamespace(tensorboard=False, mlflow_tracking_uri=stores["sqlite"])
    assert [type(cb).__name__ for cb in build_tracking_callbacks(with_mlflow)] == ["MLflowCallback"]
    flat = flatten_params({"a": {"b": [1, 2]}, "long": "x" * 7000, "none": None}, 6000)
    assert flat == {"a.b": "[1, 2]", "long": "x" * 6000, "none": "None"}
    assert epoch_scalars({"epoch": 1, "train_loss": 0.5, "ok": True, "events": []}) == {"train_loss": 0.5}


def test_resolve_tracking_uri_makes_file_stores_absolute(tmp_path):
    assert resolve_tracking_uri("mlruns", base=tmp_path) == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri(f"file://{tmp_path}/m") == (tmp_path / "m").as_uri()
    for uri in ("http://host:5000", None):
        assert resolve_tracking_uri(uri) == uri


@pytest.mark.parametrize("uri, expected", [
    ("file:/a/b", "file:///a/b"),  # the form MLflow itself prints
    ("file:///a/b", "file:///a/b"),
    ("file://localhost/a/b", "file:///a/b"),
    ("file:/a%20b", "file:///a%20b"),
    ("/a/b", "file:///a/b"),
    ("sqlite:////a/m.db", "sqlite:////a/m.db"),
    ("http://host:5000", "http://host:5000"),
    ("https://mlflow.example.com/path", "https://mlflow.example.com/path"),
    ("databricks", "databricks"),
    ("databricks://profile", "databricks://profile"),
    ("postgresql://user@db/mlflow", "postgresql://user@db/mlflow"),
    ("myplugin://store/x", "myplugin://store/x"),  # a plugin scheme: MLflow's to interpret
])
def test_resolve_tracking_uri_every_absolute_form(uri, expected):
    assert resolve_tracking_uri(uri, base="/elsewhere") == expected


def test_resolve_tracking_uri_relative_forms_follow_the_driver_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert resolve_tracking_uri("mlruns", base=tmp_path) == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("file:mlruns", base=tmp_path) == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("~/mlruns", base=tmp_path) == (home / "mlruns").as_uri()
    # sqlite:/// + a relative path: made absolute against the driver's directory, so every Ray worker agrees
    assert resolve_tracking_uri("sqlite:///m.db", base=tmp_path) == f"sqlite:///{tmp_path / 'm.db'}"
    assert resolve_tracking_uri("sqlite:///m.db?timeout=5", base=tmp_path) == f"sqlite:///{tmp_path}/m.db?timeout=5"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve() / 'm.db'}"


@pytest.mark.parametrize("uri, needle", [
    ("C:\\mlruns", "Windows drive path"),
    ("C:/mlruns", "Windows drive path"),
    ("file://otherhost/a", "must be local"),
    ("http:/nohost", "no host"),
])
def test_resolve_tracking_uri_refuses_unusable_forms_in_one_line(uri, needle):
    from dyrep_ray.errors import UserError

    with pytest.raises(UserError, match=needle) as info:
        resolve_tracking_uri(uri)
    assert "\n" not in str(info.value)


def test_train_with_a_windows_tracking_path_exits_2_and_writes_nothing(tmp_path, capsys):
    from dyrep_ray.cli import main

    out = tmp_path / "out"
    assert main(["train", "--local", "--cpu", "--output", str(out), "--name", "w",
                 "--set", "mlflow_tracking_uri=C:/mlruns"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Windows drive path" in err[0]
    assert not (out / "w").exists()


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real ``mlflow server`` (sqlite backend) on a free local port; stopped after the test."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow server exited during start"
            assert time.monotonic() < deadline, f"mlflow server not up after {SERVER_START_S} s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        proc.wait(timeout=30)


@pytest.mark.slow
def test_tracking_to_a_real_mlflow_server(tracked_run, mlflow_server, tmp_path):
    run_dir = tmp_path / "served"
    callback = MLflowCallback(mlflow_server)
    trainer = _replay_trainer(tracked_run, run_dir)
    _replay(trainer, [callback], tracked_run.rows)
    callback.on_fit_end(trainer, tracked_run.summary)
    assert callback.enabled
    client = MlflowClient(tracking_uri=mlflow_server)
    for key in TRACKED_KEYS:
        assert metric_history(client, callback.run_id, key) == {r["epoch"]: float(r[key]) for r in tracked_run.rows}
    assert client.get_run(callback.run_id).data.params["model"] == tracked_run.cfg.model
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    assert log_deployed_artifacts(run_dir, weights) is True
    assert artifact_paths(client, callback.run_id, "deployed") == {"deployed/w.safetensors"}


@pytest.mark.ray
def test_ray_run_tracks_from_rank_0_only(ray_reference):
    """``run_distributed`` with 2 workers (the session's ``ray_reference`` run, tests/conftest.py): one event
    file, one MLflow run, both equal to metrics.jsonl; the MLflow settings of the driver's environment (there the
    experiment name, set after Ray started, as a user attaching to a running cluster would) are what rank 0's
    worker logs with."""
    from tests.conftest import REFERENCE_MLFLOW_EXPERIMENT

    out, cfg, summary = ray_reference
    store = cfg.mlflow_tracking_uri
    assert store and store.startswith("sqlite:///")
    run_dir = out / "ref"
    rows = read_rows(run_dir)
    assert summary["epochs"] == cfg.epochs == len(rows)
    event_files = list((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # rank 1 wrote none
    scalars, texts = read_tensorboard(run_dir / TENSORBOARD_DIR)
    for key in ("train_loss", "val_top1", "params"):
        assert scalars[key] == {r["epoch"]: pytest.approx(r[key], rel=1e-6) for r in rows}, key
    grown = [r["epoch"] for r in rows if r["events"]]
    assert grown and set(grown) <= set(texts["structure_events/text_summary"])
    info = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=store)
    assert client.get_experiment(info["experiment_id"]).name == REFERENCE_MLFLOW_EXPERIMENT
    runs = client.search_runs([info["experiment_id"]])
    assert [r.info.run_id for r in runs] == [info["run_id"]]  # one run: rank 0's
    assert runs[0].info.status == "FINISHED"
    for key in ("val_top1", "train_loss"):
        assert metric_history(client, info["run_id"], key) == {r["epoch"]: pytest.approx(r[key], rel=1e-6)
                                                              for r in rows}, key
    assert STRUCTURE_FILE in artifact_paths(client, info["run_id"])


def test_driver_tracking_environment_carries_mlflow_settings_only_when_tracking(monkeypatch):
    import os

    from dyrep_ray.tracking import DriverTrackingEnvironment

    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:  # what earlier tests' MLflow clients set
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "driver-token")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "driver-user")
    assert DriverTrackingEnvironment(None).values == {}  # no MLflow tracking: nothing captured
    carried = DriverTrackingEnvironment("http://mlflow:5000")
    assert carried.values == {"MLFLOW_TRACKING_TOKEN": "driver-token", "MLFLOW_TRACKING_USERNAME": "driver-user"}
    # in a worker: what it lacks is set, what its cluster set stays
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cluster-user")
    carried.configure()
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "driver-token"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "cluster-user"
