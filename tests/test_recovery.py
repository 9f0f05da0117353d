"""How a Ray run recovers, without a cluster: the run's Ray Train settings reach ``fit``'s environment, and a
restart waits for silent nodes to be declared dead before Ray's capacity view is refreshed (Ray's own view is
faked; the real thing runs in tests/test_multinode.py's chaos test)."""

from __future__ import annotations

import os
import socket

import pytest
import ray
from ray.train.v2._internal.execution.controller.state import (
    ReschedulingState,
    RestartingState,
    RunningState,
)

from dyrep_ray.distributed import recovery
from dyrep_ray.engine.config import TrainConfig
from dyrep_ray.engine.config_rules import ConfigError

START, POLL = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"


def test_run_settings_set_for_fit_then_restored(monkeypatch):
    monkeypatch.setenv(START, "60")
    monkeypatch.delenv(POLL, raising=False)
    cfg = TrainConfig(worker_group_start_timeout_s=12.5, preemption_poll_interval_s=0.5)
    with recovery.ray_train_env(cfg) as values:
        assert values == {START: "12.5", POLL: "0.5"}
        assert os.environ[START] == "12.5" and os.environ[POLL] == "0.5"
    assert os.environ[START] == "60" and POLL not in os.environ  # the driver's own settings come back
    # null: the variable (or Ray's default) is left alone; the drain poll defaults to 1 s (Ray's 5 s)
    assert recovery.ray_train_env_values(TrainConfig(preemption_poll_interval_s=None)) == {}
    assert recovery.ray_train_env_values(TrainConfig()) == {POLL: "1"}
    for key in recovery.RAY_TRAIN_ENV_KEYS:
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{key: 0})


def _node(node_id: str, port: int, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port}


def test_silent_nodes_are_those_whose_raylet_takes_no_connection(monkeypatch):
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused, as to a dead raylet
        nodes = [_node("live", listening.getsockname()[1]), _node("gone", closed.getsockname()[1]),
                 _node("dead", closed.getsockname()[1], alive=False)]
        monkeypatch.setattr(ray, "nodes", lambda: nodes)
        assert recovery.silent_alive_nodes() == ["gone"]  # the GCS already knows "dead"


def test_a_failed_node_probe_warns_in_one_line_and_keeps_its_traceback_for_debug(monkeypatch):
    """The controller's log reaches the user's console: a warning there is one line, not a traceback."""
    import logging

    from tests.conftest import RecordList

    def state_api_down():
        raise RuntimeError("GCS unavailable\n  (a second line of detail)")

    monkeypatch.setattr(ray, "nodes", state_api_down)
    handler, logger = RecordList(), logging.getLogger(recovery.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        assert recovery.silent_alive_nodes() == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    warnings = [r for r in handler.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "could not probe the cluster's nodes before a restart (RuntimeError: GCS unavailable (a second line of "
        "detail))"]
    assert warnings[0].exc_info is None and any(r.exc_info for r in handler.records if r.levelno == logging.DEBUG)


def test_wait_declared_dead_until_the_gcs_agrees_or_the_limit(monkeypatch):
    answers = iter([[_node("gone", 1)], [_node("gone", 1)], [_node("gone", 1, alive=False)]])
    monkeypatch.setattr(ray, "nodes", lambda: next(answers))
    monkeypatch.setattr(recovery, "DEATH_WAIT_POLL_S", 0.0)
    assert recovery.wait_declared_dead(["gone"], limit_s=5.0)
    monkeypatch.setattr(ray, "nodes", lambda: [_node("gone", 1)])
    assert not recovery.wait_declared_dead(["gone"], limit_s=0.05)


def test_capacity_is_refreshed_when_a_new_group_is_about_to_be_sized(monkeypatch):
    calls = []
    monkeypatch.setattr(recovery, "silent_alive_nodes", lambda: ["gone"])
    monkeypatch.setattr(recovery, "wait_declared_dead", lambda ids: calls.append(("wait", tuple(ids))))
    monkeypatch.setattr(recovery, "refresh_coordinator_nodes", lambda: calls.append("refresh"))
    callback = recovery.FreshCapacityOnRestart()
    error = RuntimeError("a worker died")
    callback.after_controller_state_update(RunningState(), RunningState())
    assert calls == []
    callback.after_controller_state_update(RunningState(), RestartingState(training_failed_error=error))
    assert calls == [("wait", ("gone",)), "refresh"]  # wait for the GCS first, then re-read the nodes
    callback.after_controller_state_update(RestartingState(training_failed_error=error),
                                           RestartingState(training_failed_error=error))
    assert len(calls) == 2  # once per restart, not on every loop of the controller while it waits
    callback.after_controller_state_update(RunningState(), ReschedulingState(training_failed_error=error))
    assert len(calls) == 4  # a failed start (e.g. the start timeout) sizes again on a fresh view
