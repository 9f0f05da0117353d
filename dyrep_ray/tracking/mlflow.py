"""MLflow tracking: one MLflow run per dyrep-ray run, continued on resume, and the deployed weights after convert.

``mlflow_tracking_uri`` may be a local file store (a path or ``file:`` URI), a database store
(``sqlite:////abs/path/mlflow.db``) or a tracking server (``http(s)://host:port``). What is logged:

* params: the resolved config, flattened (lists/dicts as JSON, values cut to MLflow's length limit; the full
  config is also the artifact ``config.json``), plus the plain model's params/MACs;
* metrics, ``step = epoch``: every number of the metrics.jsonl row, and ``grows``/``cuts`` (events that epoch);
* artifacts: ``structure_events/epoch_NNNN.json`` (the grow/cut events) and ``structure/epoch_NNNN.json``
  (the structure graph after that adjust) at every adjust, ``structure.json`` and ``metrics.jsonl`` at the end,
  and ``deployed/`` (safetensors + sidecar) from :func:`log_deployed_artifacts`.

The MLflow run id is kept in ``<run_dir>/tracking.json``, so a resumed run continues the same MLflow run
(epochs it already holds are not logged twice) and ``convert`` finds it. mlflow is imported only when a run
actually tracks to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from ..environ import environ
from ..rundir.layout import METRICS_FILE, TRACKING_FILE
from ..rundir.storage import RunStorage, as_storage
from .base import (
    TrackingCallback,
    epoch_scalars,
    event_counts,
    one_line,
)

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dyrep-ray"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable: respected when set
# The reachability probe must fail in about a second on a closed port, not after MLflow's default
# 7 retries with exponential backoff (minutes).
PROBE_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# After a good probe: a server that goes away mid-run costs one bounded stall, then the backend is off.
# Set only where the user has not set them.
RUN_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow 3 refuses file stores unless this is set; a user who names a file store has chosen one.
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
# A sqlite store keeps no artifacts itself; without a location MLflow would use ./mlruns of whatever
# directory the (Ray worker) process runs in. Artifacts go beside the database instead.
SQLITE_PREFIX = "sqlite:///"
SQLITE_ARTIFACTS_DIR = "mlflow-artifacts"
RUN_DIR_TAG = "dyrep_ray.run_dir"
RESUMED_PARAM_TAG = "dyrep_ray.resumed."  # + key: a config value that differs from the run's first logging
STRUCTURE_ARTIFACT_DIR = "structure"
EVENTS_ARTIFACT_DIR = "structure_events"
DEPLOYED_ARTIFACT_DIR = "deployed"
CONFIG_ARTIFACT = "config.json"
STRUCTURE_ARTIFACT = "structure.json"
# Logged every epoch: its history tells a resumed run which epochs the MLflow run already holds.
EPOCH_SENTINEL_METRIC = "train_loss"
SUMMARY_PREFIX = "summary."
# MLflow prints its schema-creation steps for a new sqlite store on its own console handler; our one
# "MLflow run ..." line says where the run went.
QUIET_MLFLOW_LOGGERS = ("mlflow.store.db.utils",)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


@contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def connect(tracking_uri: str):
    """An ``MlflowClient`` for ``tracking_uri`` whose store answered a request (raises otherwise, fast)."""
    from mlflow.tracking import MlflowClient

    if is_file_store(tracking_uri):
        os.environ.setdefault(FILE_STORE_ENV, "true")
    if is_http(tracking_uri):
        for key, value in RUN_HTTP_ENV.items():
            os.environ.setdefault(key, value)
    with environ(PROBE_HTTP_ENV if is_http(tracking_uri) else {}), _quiet(QUIET_MLFLOW_LOGGERS):
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    database = Path(tracking_uri[len(SQLITE_PREFIX):]).resolve()
    return (database.parent / SQLITE_ARTIFACTS_DIR).as_uri()


def experiment_id_for(client, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=sqlite_artifact_location(tracking_uri))
    except MlflowException:  # created meanwhile by a parallel run (a sweep's trials)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_params(config: dict, max_value_length: int, prefix: str = "") -> dict[str, str]:
    """``{key: str}`` for MLflow: nested dicts as dotted keys, lists as JSON, values cut to the limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, max_value_length, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        flat[name] = text[:max_value_length]
    return flat


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def read_tracking_info(storage: RunStorage) -> dict:
    """The run directory's tracking.json (``{}`` when absent or unreadable: a new MLflow run is started)."""
    text = storage.read_text(TRACKING_FILE)
    if text is None:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        logger.info("%s is not valid JSON; starting a new MLflow run", storage.path(TRACKING_FILE))
        return {}
    return info if isinstance(info, dict) else {}


class MLflowCallback(TrackingCallback):
    backend = "MLflow"

    def __init__(self, tracking_uri: str, run_dir=None, experiment: str | None = None):
        super().__init__(run_dir)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        self.client = None
        self.run_id: str | None = None
        self.logged_through = 0  # last epoch this MLflow run holds metrics for
        self._pending_adjust: list | None = None

    # ------------------------------------------------------------------ start / resume
    def _fit_start(self, trainer) -> None:
        try:
            self.client = connect(self.tracking_uri)
        except ImportError as exc:
            self.disable("the mlflow package is not installed (pip install 'dyrep-ray[tracking]')", exc)
            return
        except Exception as exc:  # noqa: BLE001 -- unreachable server, unusable store: one warning, run goes on
            self.disable(f"cannot use tracking URI {self.tracking_uri}", exc)
            return
        run = self._continued_run()
        resumed = run is not None
        if run is None:
            experiment_id = experiment_id_for(self.client, self.tracking_uri, self.experiment_name)
            run = self.client.create_run(experiment_id, run_name=self.storage.root.rsplit("/", 1)[-1],
                                         tags={RUN_DIR_TAG: self.storage.root})
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            history = self.client.get_metric_history(run.info.run_id, EPOCH_SENTINEL_METRIC)
            self.logged_through = max((m.step for m in history), default=0)
        self.run_id = run.info.run_id
        self.storage.write_text(TRACKING_FILE, json.dumps({"mlflow": {
            "tracking_uri": self.tracking_uri, "experiment_id": run.info.experiment_id, "run_id": self.run_id,
        }}, indent=1))
        self._log_params(trainer, run.data.params)
        if not resumed:
            self.client.log_dict(self.run_id, trainer.cfg.to_dict(), CONFIG_ARTIFACT)
        logger.info("MLflow run %s (%s) in experiment %r at %s%s", self.run_id, run.info.run_name,
                    self.experiment_name, self.tracking_uri, " (continued)" if resumed else "")

    def _continued_run(self):
        """The MLflow run recorded in tracking.json, if it is in this store and still exists."""
        from mlflow.exceptions import MlflowException

        info = read_tracking_info(self.storage).get("mlflow") or {}
        if info.get("tracking_uri") != self.tracking_uri or not info.get("run_id"):
            return None
        try:
            run = self.client.get_run(info["run_id"])
        except MlflowException:
            logger.info("MLflow run %s of %s no longer exists; starting a new one", info["run_id"],
                        self.storage.path(TRACKING_FILE))
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def _log_params(self, trainer, existing: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import (
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        params = flatten_params(trainer.cfg.to_dict(), MAX_PARAM_VAL_LENGTH)
        params.update(flatten_params({"model": {"plain_params": trainer.plain_params,
                                                "plain_macs": trainer.plain_macs}}, MAX_PARAM_VAL_LENGTH))
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        # MLflow params are immutable: a value changed on resume (e.g. more epochs) is recorded as a tag.
        changed = [RunTag(RESUMED_PARAM_TAG + k, v) for k, v in params.items() if k in existing and existing[k] != v]
        for batch in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        for batch in _chunks(changed, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch)

    # ------------------------------------------------------------------ epochs
    def _adjust(self, trainer, epoch: int, events: list) -> None:
        self._pending_adjust = list(events)  # logged with the epoch's row, under its 1-based epoch number

    def _epoch_end(self, trainer, metrics: dict) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        epoch = int(metrics["epoch"])
        events = self._pending_adjust if self._pending_adjust is not None else list(metrics.get("events", []))
        adjusted = self._pending_adjust is not None or bool(events)
        self._pending_adjust = None
        if epoch <= self.logged_through:  # resumed: this MLflow run already holds the epoch
            return
        values = {**epoch_scalars(metrics), **event_counts(events)}
        now_ms = int(time.time() * 1000)
        rows = [Metric(key, float(value), now_ms, epoch) for key, value in values.items()]
        for batch in _chunks(rows, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)
        if adjusted:
            from ..rep import structure_graph

            self.client.log_dict(self.run_id, {"epoch": epoch, "events": events},
                                 f"{EVENTS_ARTIFACT_DIR}/epoch_{epoch:04d}.json")
            self.client.log_dict(self.run_id, structure_graph(trainer.model),
                                 f"{STRUCTURE_ARTIFACT_DIR}/epoch_{epoch:04d}.json")
        self.logged_through = epoch

    def _fit_end(self, trainer, summary: dict) -> None:
        from mlflow.entities import Metric

        from ..rep import structure_graph

        self.client.log_dict(self.run_id, structure_graph(trainer.model), STRUCTURE_ARTIFACT)
        metrics_text = self.storage.read_text(METRICS_FILE)
        if metrics_text is not None:
            self.client.log_text(self.run_id, metrics_text, METRICS_FILE)
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            now_ms, step = int(time.time() * 1000), int(summary.get("epochs", 0))
            self.client.log_batch(self.run_id, metrics=[Metric(SUMMARY_PREFIX + k, float(v), now_ms, step)
                                                        for k, v in numbers.items()])
        self.client.set_terminated(self.run_id, "FINISHED")


def log_deployed_artifacts(run_dir: str | Path | RunStorage, safetensors_path: str | Path,
                           sidecar_path: str | Path | None = None, *, tracking_uri: str | None = None) -> bool:
    """Attach ``convert``'s deployed weights (and sidecar) to the run's MLflow run, under ``deployed/``.

    ``tracking_uri``: the store to log to (``dyrep-ray convert --mlflow-tracking-uri``); None: the one the run
    directory's tracking.json names (a caller of this function asks for that; the CLI never passes None).
    Returns True when logged; False when the run has no MLflow run (no tracking.json entry: nothing to do,
    silently) or when logging failed (one warning line; convert's result stands).
    """
    try:
        info = read_tracking_info(as_storage(run_dir)).get("mlflow") or {}
    except Exception as exc:  # noqa: BLE001 -- an unreadable run directory must not fail convert here
        logger.warning("MLflow: deployed weights not logged: cannot read %s of %s (%s)", TRACKING_FILE, run_dir,
                       one_line(exc))
        return False
    if tracking_uri is not None:
        info = {**info, "tracking_uri": tracking_uri}
    if not info.get("run_id") or not info.get("tracking_uri"):
        return False
    try:
        client = connect(info["tracking_uri"])
        client.get_run(info["run_id"])  # fails clearly when the run was deleted
        for path in (safetensors_path, sidecar_path):
            if path is not None:
                client.log_artifact(info["run_id"], str(path), DEPLOYED_ARTIFACT_DIR)
    except ImportError as exc:
        logger.warning("MLflow: deployed weights not logged: the mlflow package is not installed (%s)",
                       one_line(exc))
        return False
    except Exception as exc:  # noqa: BLE001 -- tracking never fails convert
        logger.warning("MLflow: deployed weights not logged to run %s at %s (%s)", info["run_id"],
                       info["tracking_uri"], one_line(exc))
        return False
    logger.info("MLflow: logged %s to run %s", Path(safetensors_path).name, info["run_id"])
    return True
