"""A real ``ray job submit`` of ``dyrep-ray train`` to a token-authenticated local head.

The head is a separate process tree (``ray start --head`` with its own ``--temp-dir`` and ports) that
this test talks to only through the ``ray`` CLI, so it neither sees nor disturbs a Ray instance that
other tests of this pytest process (``conftest.ray_session``) or other users of the machine started.
Teardown never uses ``ray stop``: that kills every Ray process on the machine.  Instead it ends exactly
the processes of this head (found by its unique temp dir) and of its job driver (found by the GCS
address in its environment), and fails if any survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.multinode import alive as _alive
from tests.multinode import cli_env as _cli_env
from tests.multinode import ensure_token as _ensure_token
from tests.multinode import find_command as _find_command
from tests.multinode import free_ports as _free_ports
from tests.multinode import proc_text as _proc_text

pytestmark = pytest.mark.ray

JOB_TIMEOUT_S = 180
CLI_TIMEOUT_S = 60
TRAIN_ARGS = ["--set", "epochs=2", "--set", "synthetic_train_size=256", "--set", "synthetic_val_size=128",
              "--set", "batch_size=32", "--set", "dyrep_recal_bn_iters=2"]


def _head_pids(temp_dir: str, gcs_port: int) -> list[int]:
    """Processes of our head: its temp dir in the command line, or RAY_ADDRESS=<our GCS> in the environment."""
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if temp_dir in _proc_text(pid, "cmdline"):
            mine.append(pid)
            continue
        environ = _proc_text(pid, "environ")
        if any(v.startswith("RAY_ADDRESS=") and v.endswith(f":{gcs_port}") for v in environ.split(" ")):
            mine.append(pid)
    return mine


def _kill_head(temp_dir: str, gcs_port: int) -> list[int]:
    """SIGTERM, then SIGKILL, exactly our head's processes; returns the pids still alive.

    Ray's own graceful stop waits up to 16 s for raylet/GCS to drain; a throw-away test head gets 3 s.
    """
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
        pids = [p for p in _head_pids(temp_dir, gcs_port) if _alive([p])]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pids):
            time.sleep(0.2)
    return [p for p in _head_pids(temp_dir, gcs_port) if _alive([p])]


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated single-node head on free ports; yields (dashboard address, cli env)."""
    missing = [name for name in ("ray", "dyrep-ray") if _find_command(name) is None]
    assert not missing, f"the {missing} command(s) of this environment are missing (pip install -e .)"
    env = _cli_env()
    _ensure_token(env)
    # short path: Ray's unix socket paths (<temp>/session_.../sockets/...) must stay under 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="dyrep-jt-", dir="/tmp")
    (gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env_agent, node_manager,
     object_manager) = _free_ports(9)
    cmd = ["ray", "start", "--head", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=4", "--num-gpus=0", "--object-store-memory=200000000",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env_agent}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        survivors = _kill_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of the test head survived teardown: {survivors}"


def _ray_job(env: dict, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_dyrep_train(ray_head, tmp_path):
    address, env = ray_head
    workdir = tmp_path / "workdir"  # tiny upload: the package itself is installed on the "cluster"
    workdir.mkdir()
    (workdir / "README").write_text("working_dir of the job-submit test\n")
    output = tmp_path / "out"
    submission_id = f"dyrep-test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    try:
        submit = _ray_job(env, "submit", "--address", address, "--working-dir", str(workdir),
                          "--submission-id", submission_id, "--",
                          "dyrep-ray", "train", *TRAIN_ARGS, "--output", str(output), "--name", "job", "--verbose",
                          timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        _ray_job(env, "stop", "--address", address, submission_id)
        pytest.fail(f"job did not finish within {JOB_TIMEOUT_S}s; last output:\n{(exc.stdout or b'')[-3000:]!r}")
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, f"ray job submit failed (rc {submit.returncode}):\n{logs[-6000:]}"
    status = _ray_job(env, "status", "--address", address, "--log-style", "record", submission_id)
    status_text = status.stdout + status.stderr
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status_text, status_text

    # the driver attached to the job's cluster (RAY_ADDRESS set by the job supervisor), not a new instance
    # Ray's own INFO lines are shown with --verbose only (the default console hides them).
    assert "Connecting to existing Ray cluster" in logs, logs[-6000:]
    assert "dyrep-ray: job:" in logs and "after 2 epochs" in logs, logs[-6000:]
    lines = [json.loads(x) for x in (output / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[0]["events"] and lines[0]["events"][0]["op"] == "grow"
    digests = lines[0]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert any(p.name.startswith("checkpoint_") for p in (output / "job").iterdir())
    print(f"ray job submit round trip: {time.monotonic() - t0:.1f}s")
