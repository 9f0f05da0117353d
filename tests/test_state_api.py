"""A head without a dashboard records one anyway; another Ray instance's dashboard there makes Ray Train remove
a run's workers (dyrep_ray/distributed/state_api.py).  Real Ray instances, each in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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

# A local instance connect() starts, beside the other one: the cleaner's look-up (no address, as it makes it)
# finds this instance's own state API; the driver's own environment is as it was.
ray.shutdown()
connect()
from ray.dashboard.utils import get_address_for_submission_client

@ray.remote(num_cpus=0)
def cleaners_lookup(actor_id):
    try:
        return {"alive": is_actor_alive(actor_id, timeout=10), "url": get_address_for_submission_client(None)}
    except Exception as exc:
        return {"alive": f"{type(exc).__name__}: {exc}"}

actor = Alive.remote()
ray.get(actor.ping.remote())
out["own"] = {**ray.get(cleaners_lookup.remote(actor._actor_id.hex())), "recorded": recorded_state_api(),
              "driver_env": os.environ.get("RAY_API_SERVER_ADDRESS")}
try:  # the same look-up with no help: what the cleaner met before
    out["own"]["unaided"] = get_address_for_submission_client(None)
except ConnectionError as exc:
    out["own"]["unaided"] = str(exc)
ray.shutdown()
other.stdin.close()
other.wait(timeout=60)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    # Ray's temp dir of its own (short: Ray's socket paths must fit), so no `ray start` head of another test is
    # recorded where connect() looks
    ray_tmp = Path(tempfile.mkdtemp(prefix="dyrep-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT_S,
                             cwd=ROOT, env={**env, "RAY_TMPDIR": str(ray_tmp)})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_another_instances_dashboard_on_the_recorded_port_is_found_before_it_removes_a_runs_workers(probe):
    """The hazard and its check: once another instance's dashboard takes the recorded port, Ray's state API says
    a live actor does not exist (the lookup Ray Train's PlacementGroupCleaner makes), and ``foreign_state_api``
    names that URL, and ``connect`` refuses the cluster with the fix; before, nothing answers there."""
    result = probe
    alone, beside = result["alone"], result["beside_another"]
    assert alone["foreign"] is None and alone["actor_alive"] == "ServerUnavailable", result
    assert beside["recorded"] == alone["recorded"] == f"http://127.0.0.1:{result['foreign_port']}", result
    assert beside["actor_alive"] is None, result  # "no such actor": the cleaner would remove the run's workers
    assert beside["foreign"] == beside["recorded"], result
    assert beside["recorded"] in result["connect"] and "--dashboard-port" in result["connect"], result


def test_a_local_instance_connect_starts_answers_its_own_actors_state_lookups_beside_another(probe):
    """Without an address, Ray's state-API look-up (Ray Train's PlacementGroupCleaner's) fails with two Ray
    instances on the machine; in a local instance ``connect`` starts it finds that instance's own dashboard."""
    own = probe["own"]
    assert own["alive"] is True, own  # the live actor is found alive: the cleaner keeps the run's workers
    assert own["url"] == own["recorded"] and own["recorded"] != probe["alone"]["recorded"], own
    assert "Found multiple active Ray instances" in own["unaided"], own
    assert own["driver_env"] is None, own  # the driver's environment is restored


def test_the_shared_test_instance_records_its_state_api_on_a_free_port_not_8265(ray_session):
    """tests/conftest.py starts its instance with ``ray_init_without_dashboard``: Ray's default 8265 is where a
    concurrent test's local ``dyrep-ray train`` puts its dashboard."""
    from dyrep_ray.distributed.state_api import foreign_state_api, recorded_state_api

    recorded = recorded_state_api()
    assert recorded is not None and not recorded.endswith(":8265") and foreign_state_api() is None
