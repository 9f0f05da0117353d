"""Experiment tracking: TensorBoard event files in the run directory and MLflow runs, as training-loop callbacks.

Both backends run on rank 0 only (every other rank's callbacks do nothing). TensorBoard (on by default) is a
base requirement; MLflow is optional (``pip install 'dyrep-ray[tracking]'``). A tracking problem -- a missing
package, an unreachable MLflow server, an unwritable TensorBoard directory, a failure mid-run -- is logged as ONE
warning line and switches that backend off for the rest of the run; training never fails because of tracking.

This module imports neither torch, mlflow nor tensorboard: the CLI may import it at start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..engine.callbacks import TrainerCallback
from ..errors import UserError
from ..rundir.layout import TENSORBOARD_DIR, TRACKING_FILE
from ..rundir.storage import RunStorage
from .base import TrackingCallback

__all__ = [
    "DriverTrackingEnvironment",
    "TENSORBOARD_DIR",
    "TRACKING_FILE",
    "TrackingCallback",
    "TrackingURIError",
    "build_tracking_callbacks",
    "resolve_tracking_uri",
]

# Bare names MLflow reads as a tracking service, not as a directory.
_SERVICE_NAMES = frozenset({"databricks", "databricks-uc", "uc"})
_LOCAL_HOSTS = ("", "localhost")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")


class TrackingURIError(UserError, ValueError):
    """An ``mlflow_tracking_uri`` this tool cannot use as given."""


def resolve_tracking_uri(uri: str | None, base: str | Path | None = None) -> str | None:
    """``uri`` with a local store made absolute against ``base`` (default: the current directory).

    Ray workers run in other directories, so the driver resolves the address once, before launch.  Parsed with
    :mod:`urllib.parse`: a path (relative, absolute, ``~``) or a ``file:`` URI (``file:/a``, ``file:///a``,
    ``file://localhost/a``) becomes ``file:///<absolute path>``; ``sqlite:///rel.db`` (three slashes: relative
    to the current directory) becomes ``sqlite:////<absolute path>`` (four slashes: absolute); ``http(s)://``
    servers, other database URIs and plugin schemes (``databricks``, ...) are returned as they are; so is
    ``None`` (MLflow off).  A Windows drive path or a ``file:`` URI on another host raises
    :class:`TrackingURIError`.
    """
    if uri is None or uri in _SERVICE_NAMES:
        return uri
    if _WINDOWS_DRIVE.match(uri):
        raise TrackingURIError(f"mlflow_tracking_uri {uri!r} is a Windows drive path, which this tool does not "
                               "support; give a POSIX path (e.g. mlruns or /data/mlruns) or a server URL")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    here = Path(base or Path.cwd())
    if scheme == "":
        return _absolute(Path(uri).expanduser(), here).as_uri()
    if scheme == "file":
        if parts.netloc not in _LOCAL_HOSTS:
            raise TrackingURIError(f"mlflow_tracking_uri {uri!r} names the host {parts.netloc!r}; a file store "
                                   "must be local: use file:///path (or a path), or an http(s):// server")
        return _absolute(Path(unquote(parts.path)), here).as_uri()
    if scheme == "sqlite" and parts.path not in ("", "/", "/:memory:"):
        database = parts.path[1:]  # sqlite:///x -> "x" (relative), sqlite:////x -> "/x" (absolute)
        query = f"?{parts.query}" if parts.query else ""
        return f"sqlite:///{_absolute(Path(database), here)}{query}"
    if scheme in ("http", "https") and not parts.netloc:
        raise TrackingURIError(f"mlflow_tracking_uri {uri!r} has no host; e.g. http://127.0.0.1:5000")
    return uri  # a server, another database or a plugin store: MLflow's to interpret


def _absolute(path: Path, base: Path) -> Path:
    return (path if path.is_absolute() else base / path).resolve()


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

