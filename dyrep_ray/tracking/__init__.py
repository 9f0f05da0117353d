"""Experiment tracking: TensorBoard event files in the run directory and MLflow runs, as training-loop callbacks.

Both backends run on rank 0 only (every other rank's callbacks do nothing). TensorBoard (on by default) is a
base requirement; MLflow is optional (``pip install 'dyrep-ray[tracking]'``). A tracking problem -- a missing
package, an unreachable MLflow server, an unwritable TensorBoard directory, a failure mid-run -- is logged as ONE
warning line and switches that backend off for the rest of the run; training never fails because of tracking.

This module imports neither torch, mlflow nor tensorboard: the CLI may import it at start.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..engine.callbacks import TrainerCallback
from ..rundir.layout import TENSORBOARD_DIR, TRACKING_FILE
from ..rundir.storage import RunStorage
from .base import TrackingCallback

__all__ = [
    "DriverTrackingEnvironment",
    "TENSORBOARD_DIR",
    "TRACKING_FILE",
    "TrackingCallback",
    "build_tracking_callbacks",
    "resolve_tracking_uri",
]

# URI schemes MLflow treats as remote (server, Databricks) or database stores: passed through unchanged.
_NON_PATH_SCHEMES = ("http://", "https://", "databricks", "sqlite:", "postgresql", "mysql", "mssql")


def resolve_tracking_uri(uri: str | None, base: str | Path | None = None) -> str | None:
    """``uri`` with a relative local file-store path made absolute (Ray workers run in other directories).

    Server URLs and database URIs (``sqlite:///...``: three slashes relative, four absolute) are returned as
    they are; so is ``None`` (tracking to MLflow off).
    """
    if uri is None or uri.startswith(_NON_PATH_SCHEMES):
        return uri
    local = uri.removeprefix("file://")
    if "://" in local:  # another scheme MLflow may know (a plugin store): leave it to MLflow
        return uri
    path = Path(local).expanduser()
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    return path.resolve().as_uri()


#: MLflow reads its client settings from the environment of the process that logs (MLFLOW_TRACKING_TOKEN,
#: _USERNAME/_PASSWORD, TLS paths, MLFLOW_EXPERIMENT_NAME, MLFLOW_S3_ENDPOINT_URL, ...).
MLFLOW_ENV_PREFIX = "MLFLOW_"


class DriverTrackingEnvironment(TrainerCallback):
    """The driver's MLflow settings, carried to the Ray workers that log.

    A Ray worker's environment was fixed when its Ray instance started -- by ``ray start`` on a cluster, or by an
    earlier command -- not by the driver where the user exported the variables. Built in the driver (only when
    the run tracks to MLflow: nothing is captured otherwise); :meth:`configure` runs in each worker before its
    tracking callbacks are built and sets each variable the worker does not have itself (a cluster's own wins).
    """

    def __init__(self, mlflow_tracking_uri: str | None) -> None:
        self.values = ({k: v for k, v in os.environ.items() if k.startswith(MLFLOW_ENV_PREFIX)}
                       if mlflow_tracking_uri else {})

    def configure(self) -> None:
        for key, value in self.values.items():
            os.environ.setdefault(key, value)


def build_tracking_callbacks(cfg, run_dir: str | Path | RunStorage | None = None) -> list[TrackingCallback]:
    """The tracking callbacks ``cfg`` asks for, for the run directory ``run_dir``.

    ``run_dir=None`` means the trainer's own run directory (``trainer.ctx.storage``), read at fit start.
    Config keys: ``tensorboard`` (bool, default True) and ``mlflow_tracking_uri`` (str or None, default None).
    """
    from .mlflow import MLflowCallback
    from .tensorboard import TensorBoardCallback

    callbacks: list[TrackingCallback] = []
    if getattr(cfg, "tensorboard", True):
        callbacks.append(TensorBoardCallback(run_dir))
    uri = getattr(cfg, "mlflow_tracking_uri", None)
    if uri:
        callbacks.append(MLflowCallback(uri, run_dir))
    return callbacks

