"""A local Ray head that died without ``ray stop`` leaves its address behind: detect it in seconds.

``ray.init()`` without an address reads ``<ray temp dir>/ray_current_cluster`` (written by ``ray start``)
and, if it names a head that is gone, retries its GCS for minutes.  :func:`stale_local_cluster` applies the
same fast reachability check ``--address`` gets (:func:`dyrep_ray.distributed.trainer.check_reachable`'s
socket connect) to that file, so the caller can start a fresh local instance instead (``address="local"``).
The temp dir follows Ray's rule: ``$RAY_TMPDIR``, else ``$TMPDIR`` (Linux), else ``/tmp``, then ``ray/``.
No Ray import: the check runs before Ray is touched.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ADDRESS_FILE = "ray_current_cluster"
STALE_CHECK_TIMEOUT_S = 2.0


def ray_address_file() -> Path:
    """Where ``ray start`` records the local cluster's address (Ray's own lookup rule)."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return Path(base) / "ray" / ADDRESS_FILE


def recorded_local_cluster() -> str | None:
    """The ``host:port`` the address file names (``ray.init()`` without an address joins it), or None."""
    try:
        address = ray_address_file().read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    host, _, port = address.rpartition(":")
    return address if host and port.isdigit() else None


def stale_local_cluster(timeout_s: float = STALE_CHECK_TIMEOUT_S) -> tuple[Path, str] | None:
    """``(address file, address)`` when the file names a ``host:port`` nobody answers on, else None."""
    path, address = ray_address_file(), recorded_local_cluster()
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError:
        return path, address
