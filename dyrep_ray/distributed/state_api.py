"""Is the Ray state API this cluster records its own?  Ray Train removes a run's workers when it is not.

Ray Train's ``PlacementGroupCleaner`` (a detached actor every ``TorchTrainer`` run starts) asks the state API every
second whether the run's controller actor is alive, and removes the run's placement group, which kills every
worker, when the answer is "no such actor".  A head started without a dashboard still records a dashboard
address in its GCS (``127.0.0.1:8265`` unless ``--dashboard-port`` says otherwise).  When another Ray instance's
dashboard listens there (a second cluster, a local ``ray.init()`` of another user or test on the same host), it
answers every lookup with "no such actor", and the run fails a few seconds in with ``ControllerError: ...
Destroying worker since its placement group was removed``.  :func:`foreign_state_api` finds that case before
the run starts; where nothing answers, the cleaner only logs a warning and keeps the workers.

The cleaner finds the state API the way Ray's clients do: ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else
by looking for a GCS process on its machine -- and with two Ray instances on one machine (a notebook's
``ray.init()`` beside a ``dyrep-ray train``), that look-up fails with "Found multiple active Ray instances" and
the cleaner's thread dies with a traceback.  A local instance dyrep-ray starts (:func:`own_state_api`) therefore
gets its dashboard on a port chosen beforehand and that URL in ``RAY_API_SERVER_ADDRESS`` while it starts, which
its processes, the cleaner's included, inherit.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

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


#: Where Ray's state-API clients look first (ray.dashboard.utils.get_address_for_submission_client).
API_SERVER_ADDRESS_VAR = "RAY_API_SERVER_ADDRESS"


@contextmanager
def own_state_api() -> Iterator[dict]:
    """Around ``ray.init`` that starts a local instance: ``ray.init`` keywords that put its dashboard on a free port,
    and that port's URL in ``RAY_API_SERVER_ADDRESS`` meanwhile, so the instance's processes inherit it (see the
    module docstring).  The variable is restored afterwards; one the user set (or ``RAY_ADDRESS``) is left alone."""
    if os.environ.get(API_SERVER_ADDRESS_VAR) or os.environ.get("RAY_ADDRESS"):
        yield {}
        return
    port = free_local_port()
    os.environ[API_SERVER_ADDRESS_VAR] = f"http://127.0.0.1:{port}"
    try:
        yield {"dashboard_port": port}
    finally:
        os.environ.pop(API_SERVER_ADDRESS_VAR, None)


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
