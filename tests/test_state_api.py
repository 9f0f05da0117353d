"""A head without a dashboard records one anyway; another Ray instance's dashboard there makes Ray Train remove
a run's workers (dyrep_ray/distributed/state_api.py).  Real Ray instances, each in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

PROBE = """
import json, os, subprocess, sys
import ray
from ray.train.v2._internal.state.util import is_actor_alive
from dyrep_ray.distributed.state_api import foreign_state_api, free_local_port, recorded_state_api
from dyrep_ray.distributed.trainer import ClusterError, connect

FOREIGN = '''
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_port=int(sys.argv[1]), log_to_driver=False)
print("up", flush=True)
sys.stdin.read()
'''

@ray.remote(num_cpus=0)
class Alive:
    def ping(self):
        return True

def look(actor):
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # as inside the cluster (Ray Train's cleaner)
    try:
        alive = is_actor_alive(actor._actor_id.hex(), timeout=10)
    except Exception as exc:  # nothing answers: Ray's state API raises, the cleaner logs and keeps the workers
        alive = type(exc).__name__
    del os.environ["RAY_ADDRESS"]
    return {"recorded": recorded_state_api(), "foreign": foreign_state_api(), "actor_alive": alive}

out = {}
ray.init(address="local", num_cpus=1, log_to_driver=False, include_dashboard=False, dashboard_port=free_local_port())
actor = Alive.remote()
ray.get(actor.ping.remote())
out["alone"] = look(actor)
port = int(out["alone"]["recorded"].rsplit(":", 1)[1])
other = subprocess.Popen([sys.executable, "-c", FOREIGN, str(port)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
assert other.stdout.readline().strip() == "up"
out["foreign_port"] = port
out["beside_another"] = look(actor)
try:
    connect()
    out["connect"] = "connected"
except ClusterError as exc:
    out["connect"] = str(exc)
other.stdin.close()
other.wait(timeout=60)
print(json.dumps(out))
"""


def _probe(tmp_path: Path) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_another_instances_dashboard_on_the_recorded_port_is_found_before_it_removes_a_runs_workers(tmp_path):
    """The hazard and its check: once another instance's dashboard takes the recorded port, Ray's state API says
    a live actor does not exist (the lookup Ray Train's PlacementGroupCleaner makes), and ``foreign_state_api``
    names that URL, and ``connect`` refuses the cluster with the fix; before, nothing answers there."""
    result = _probe(tmp_path)
    alone, beside = result["alone"], result["beside_another"]
    assert alone["foreign"] is None and alone["actor_alive"] == "ServerUnavailable", result
    assert beside["recorded"] == alone["recorded"] == f"http://127.0.0.1:{result['foreign_port']}", result
    assert beside["actor_alive"] is None, result  # "no such actor": the cleaner would remove the run's workers
    assert beside["foreign"] == beside["recorded"], result
    assert beside["recorded"] in result["connect"] and "--dashboard-port" in result["connect"], result


def test_the_shared_test_instance_records_its_state_api_on_a_free_port_not_8265(ray_session):
    """tests/conftest.py starts its instance with ``ray_init_without_dashboard``: Ray's default 8265 is where a
    concurrent test's local ``dyrep-ray train`` puts its dashboard."""
    from dyrep_ray.distributed.state_api import foreign_state_api, recorded_state_api

    recorded = recorded_state_api()
    assert recorded is not None and not recorded.endswith(":8265") and foreign_state_api() is None
