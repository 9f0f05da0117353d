"""Is the Ray state API this cluster records its own?  Ray Train removes a run's workers when it is not.

Ray Train's ``PlacementGroupCleaner`` (a detached actor every ``TorchTrainer`` run starts) asks the state API every
second whether the run's controller actor is alive, and removes the run's placement group, which kills every
worker, when the answer is "no such actor".  A head started without a dashboard still records a dashboard
address in its GCS (``127.0.0.1:8265`` unless ``--dashboard-port`` says otherwise).  When another Ray instance's
dashboard listens there (a second cluster, a local ``ray.init()`` of another user or test on the same host), it
answers every lookup with "no such actor", and the run fails a few seconds in with ``ControllerError: ...
Destroying worker since its placement group was removed``.  :func:`foreign_state_api` finds that case before
the run starts; where nothing answers, the cleaner only logs a warning and keeps the workers.
"""

from __future__ import annotations

import logging
import socket

logger = logging.getLogger(__name__)

#: The state-API query of :func:`foreign_state_api`; a slower answer counts as none (the cleaner keeps waiting too).
STATE_API_CHECK_TIMEOUT_S = 5


def free_local_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_init_without_dashboard() -> dict:
    """``ray.init`` keywords for a local instance with no dashboard whose recorded state-API address is a free
    port rather than 8265, where another instance's dashboard may answer for it (see the module docstring)."""
    return {"include_dashboard": False, "dashboard_port": free_local_port()}


def recorded_state_api() -> str | None:
    """The state-API URL the connected cluster records in its GCS (where Ray's state API looks), or None."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    # one read: Ray's own lookup (ray.dashboard.utils.ray_address_to_api_server_url) retries a missing key ~40 s
    recorded = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    return f"http://{recorded.decode()}" if recorded else None


def foreign_state_api() -> str | None:
    """The state-API URL this (connected) cluster records when a Ray instance that is not this cluster answers
    there, else None: nothing answers, it is slow, or it knows this cluster's nodes."""
    import ray
    from ray.util.state import list_nodes

    url = recorded_state_api()
    if url is None:
        return None
    try:
        answered = list_nodes(address=url, timeout=STATE_API_CHECK_TIMEOUT_S, raise_on_missing_output=False)
    except Exception as exc:  # no dashboard, or a slow one: the cleaner's lookups fail the same way and keep the PG
        logger.debug("state API not queried (%s: %s)", type(exc).__name__, exc)
        return None
    ours = {node["NodeID"] for node in ray.nodes()}
    theirs = {node.node_id for node in answered}
    return url if theirs and not theirs & ours else None


def foreign_state_api_error(url: str) -> str:
    """The one line a user gets for :func:`foreign_state_api`'s case, with its fix."""
    return (f"this Ray cluster records its state API at {url}, where another Ray instance answers; Ray Train would "
            f"take this run's controller for dead and remove its workers: start the head with its dashboard "
            f"(--include-dashboard=true) or with --dashboard-port set to a free port")
