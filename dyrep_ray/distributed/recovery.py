"""How fast a Ray run recovers: the run's own Ray Train settings, and a fresh look at capacity on a restart.

After a node is lost, an elastic run restarts at the size Ray Train's scaling policy reads from Ray's
``AutoscalingCoordinator`` actor.  That actor refreshes its view of the cluster's nodes only every 20 s, so a
restart decided in between still counts the dead node's CPUs: the group is sized for them, its placement group
never fits, and the run waits out the whole worker-group start timeout before it tries again.  The same happens
when the restart comes before the GCS has declared the lost node dead (it waits for several missed health
checks, while the surviving ranks fail at once).  :class:`FreshCapacityOnRestart` acts whenever the controller
is about to size a new worker group (a restart or a reschedule): nodes the GCS lists alive whose raylet takes no
connection are given the time the GCS needs to declare them dead (bounded), then the coordinator re-reads the
nodes, so the decision counts only live capacity.

Two Ray Train settings are read by the driver (``TorchTrainer.fit`` hands them to the controller and the
workers); :func:`ray_train_env` sets them from the run's config for the duration of ``fit``:

- ``worker_group_start_timeout_s`` -> ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray's default 60 s): how long
  a start aimed at capacity that is gone (a node the GCS has not yet declared dead) blocks before a retry.
- ``preemption_poll_interval_s`` -> ``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`` (Ray's default 5 s): how often
  Ray Train looks for drained nodes, the first part of drain -> checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import ReschedulingState, RestartingState

from ..engine.config import TrainConfig
from ..environ import environ
from ..tracking.base import one_line

logger = logging.getLogger(__name__)

#: config key -> the Ray Train environment variable it sets for ``fit`` (null: the variable, else Ray's default).
RAY_TRAIN_ENV_KEYS = {
    "worker_group_start_timeout_s": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
    "preemption_poll_interval_s": "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S",
}
#: A refresh is one ``ray.nodes()`` in the coordinator; do not hang a restart on a slow answer.
REFRESH_TIMEOUT_S = 10.0
#: A raylet that accepts no TCP connection within this is taken for gone (a live one accepts in milliseconds).
RAYLET_CONNECT_TIMEOUT_S = 1.0
#: At most this long a restart waits for the GCS to declare silent nodes dead (Ray's default health check
#: declares one after about 15 s; a start aimed at a dead node would block for the whole start timeout).
DEATH_WAIT_LIMIT_S = 30.0
DEATH_WAIT_POLL_S = 0.2


def ray_train_env_values(cfg: TrainConfig) -> dict[str, str]:
    """The Ray Train environment variables ``cfg`` sets (keys left null are not set)."""
    return {env: f"{value:g}" for key, env in RAY_TRAIN_ENV_KEYS.items()
            if (value := getattr(cfg, key)) is not None}


@contextlib.contextmanager
def ray_train_env(cfg: TrainConfig) -> Iterator[dict[str, str]]:
    """Set the run's Ray Train variables in this (driver) process while ``fit`` starts the controller."""
    values = ray_train_env_values(cfg)
    with environ(values):
        yield values


class FreshCapacityOnRestart(ControllerCallback):
    """Before a new worker group is sized (a restart, a reschedule): nodes whose raylet no longer answers are
    given (boundedly) the time the GCS needs to declare them dead, then the coordinator re-reads the nodes."""

    def after_controller_state_update(self, previous_state, current_state) -> None:
        sizing = (RestartingState, ReschedulingState)
        if isinstance(current_state, sizing) and not isinstance(previous_state, sizing):
            lost = silent_alive_nodes()
            if lost:
                wait_declared_dead(lost)
            refresh_coordinator_nodes()


def silent_alive_nodes(connect_timeout_s: float = RAYLET_CONNECT_TIMEOUT_S) -> list[str]:
    """Nodes the GCS still lists alive whose raylet refuses (or does not accept) a TCP connection: a node that
    is gone, not yet declared dead (the GCS waits for several missed health checks)."""
    import ray

    def silent(node: dict) -> bool:
        try:
            with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                          timeout=connect_timeout_s):
                return False
        except OSError:
            return True

    try:
        alive = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerPort")]
        with ThreadPoolExecutor(max_workers=min(len(alive), 16) or 1) as pool:
            return [n["NodeID"] for n, quiet in zip(alive, pool.map(silent, alive), strict=True) if quiet]
    except Exception as exc:  # noqa: BLE001 - no probe: size the group on what the GCS says
        # one line on the console (the controller's log reaches it); the traceback only in the debug log
        logger.warning("could not probe the cluster's nodes before a restart (%s)", one_line(exc))
        logger.debug("node probe failure", exc_info=True)
        return []


def wait_declared_dead(node_ids: list[str], limit_s: float = DEATH_WAIT_LIMIT_S) -> bool:
    """Wait until the GCS lists none of ``node_ids`` alive (at most ``limit_s``); True if it did in time."""
    import ray

    deadline = time.monotonic() + limit_s
    pending = set(node_ids)
    logger.info("restart: waiting up to %.0f s for the GCS to declare %d unreachable node(s) dead",
                limit_s, len(pending))
    while True:
        with contextlib.suppress(Exception):  # a failed look is retried until the limit
            pending = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] in pending}
        if not pending or time.monotonic() >= deadline:
            return not pending
        time.sleep(DEATH_WAIT_POLL_S)


def refresh_coordinator_nodes() -> None:
    """One tick of Ray's ``AutoscalingCoordinator`` now (nodes re-read, reservations recomputed)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    try:
        coordinator = get_or_create_autoscaling_coordinator()
        # any requester id: recompute=True ticks before it answers (an unknown id answers {})
        ray.get(coordinator.get_reserved_resources.remote("dyrep-ray-refresh", recompute=True),
                timeout=REFRESH_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a missed refresh only delays the restart to Ray's own next tick
        logger.warning("could not refresh Ray's view of the cluster before a restart (%s); Ray's next tick "
                       "(<= 20 s) will", one_line(exc))
        logger.debug("refresh failure", exc_info=True)
