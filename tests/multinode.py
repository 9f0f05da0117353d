"""A real local multi-node Ray cluster for tests: one ``ray start --head`` plus ``ray start --address`` nodes.

Every node is its own process tree (its own raylet, object store, agents and workers), started with its own
``--temp-dir`` and in its own session (``start_new_session``), so the cluster can be changed under a run the
way a cloud changes it: :meth:`LocalRayCluster.kill_node` SIGKILLs one node's raylet and everything it
started, :meth:`LocalRayCluster.add_node` brings capacity back, :meth:`LocalRayCluster.drain_node` is Ray's
real drain (``ray drain-node``, the GCS ``DrainNode`` RPC the autoscaler uses for spot reclaims).

Nothing here calls ``ray stop`` (it kills every Ray process on the machine) or ``ray.init``: the shared Ray
instance of ``conftest.ray_session`` and other users' clusters are never touched.  A node's processes are
found by its process group, the descendants of its raylet (workers get their own process groups), and its
temp dir in a command line; teardown kills exactly those and reports any survivor.

Token authentication (Ray >= 2.59, DESIGN §5): ``RAY_AUTH_MODE=token`` in every CLI environment, token in
``~/.ray/auth_token`` (generated once if missing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dyrep_ray.engine.callbacks import TrainerCallback

CLI_TIMEOUT_S = 60
NODE_START_TIMEOUT_S = 180  # `ray start` takes 15-20 s on an idle 2-core machine, much longer under load
NODE_WAIT_POLL_S = 1.0
NODE_START_ATTEMPTS = 3
KILL_GRACE_S = 5.0
HEAD_STOP_GRACE_S = 3.0  # Ray's graceful stop waits up to 16 s; a throw-away test head gets 3 s
OBJECT_STORE_BYTES = 100_000_000
RAYLET_BINARY = "raylet/raylet"
DRAIN_REASON_PREEMPTION = "DRAIN_NODE_REASON_PREEMPTION"
TEMP_PREFIX = "dyrep-mn-"  # short: Ray's unix socket paths (<temp>/session_.../sockets/...) must stay < 108 bytes


# ------------------------------------------------------------------ process helpers (shared with test_job_submit)
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cli_env(extra: dict | None = None) -> dict:
    """Environment for ``ray`` CLI calls and drivers of a test cluster: token auth, no inherited address.

    The running interpreter's scripts directory comes first on PATH: the ``ray`` and ``dyrep-ray`` commands of
    the environment under test are found even when its venv was not activated (``/venv/bin/python -m pytest``).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    env.update(extra or {})
    return env


def find_command(name: str) -> str | None:
    """``name`` as :func:`cli_env`'s PATH finds it (the running interpreter's environment first)."""
    return shutil.which(name, path=cli_env()["PATH"])


def ensure_token(env: dict) -> None:
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    # creates ~/.ray/auth_token (mode 600); its stdout is the token: never log it
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, check=True, timeout=CLI_TIMEOUT_S)


def proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pids) -> bool:
    for pid in pids:
        status = proc_text(pid, "status")
        if status and "State:\tZ" not in status:
            return True
    return False


def _all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _stat_fields(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of ``pid``, or None if it is gone."""
    text = proc_text(pid, "stat")
    if not text:
        return None
    rest = text[text.rfind(")") + 2:].split()  # the command name may contain spaces
    return int(rest[1]), int(rest[2])


def tree_pids(roots: set[int], pgids: set[int] = frozenset(), markers: tuple[str, ...] = ()) -> list[int]:
    """``roots``, their descendants, members of ``pgids`` and processes whose command line holds a marker."""
    me = os.getpid()
    parent, found = {}, set(roots)
    for pid in _all_pids():
        if pid == me:
            continue
        fields = _stat_fields(pid)
        if fields is None:
            continue
        parent[pid] = fields[0]
        if fields[1] in pgids or (markers and any(m in proc_text(pid, "cmdline") for m in markers)):
            found.add(pid)
    grew = True
    while grew:  # descendants: Ray workers are children of their raylet but lead their own process groups
        new = {pid for pid, ppid in parent.items() if ppid in found and pid not in found}
        found |= new
        grew = bool(new)
    return sorted(p for p in found if p != me)


def kill_pids(collect, first_signal: int = signal.SIGKILL, grace: float = KILL_GRACE_S) -> list[int]:
    """Signal the processes ``collect()`` returns (re-collected each round, so late children are caught);
    returns those still alive at the end."""
    rounds = ((first_signal, grace), (signal.SIGKILL, grace), (signal.SIGKILL, grace))
    for sig, wait in rounds:
        pids = [p for p in collect() if alive([p])]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive(pids):
            time.sleep(0.1)
    return [p for p in collect() if alive([p])]


# ------------------------------------------------------------------------------------------- the cluster
@dataclass
class RayNode:
    """One ``ray start`` node of a :class:`LocalRayCluster`."""

    temp_dir: str
    num_cpus: int
    pgid: int  # the session/process group its `ray start` was launched in
    is_head: bool
    node_id: str = ""
    killed: bool = False

    def pids(self) -> list[int]:
        return tree_pids({p for p in (self.raylet_pid(),) if p}, {self.pgid}, (self.temp_dir,))

    def raylet_pid(self) -> int | None:
        for pid in _all_pids():
            fields = _stat_fields(pid)
            if fields is None or fields[1] != self.pgid:
                continue
            cmdline = proc_text(pid, "cmdline")
            if RAYLET_BINARY in cmdline and self.temp_dir in cmdline:
                return pid
        return None


class LocalRayCluster:
    """A head and worker nodes on this machine; talk to it only through subprocesses (CLI or drivers)."""

    def __init__(self, head_cpus: int = 1, env: dict | None = None):
        if find_command("ray") is None:
            raise RuntimeError(f"needs the `ray` command (ray[default]) beside {sys.executable} or on PATH")
        self.env = cli_env(env)
        ensure_token(self.env)
        self.head_cpus = head_cpus
        self.port = 0
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- nodes
    def start(self) -> RayNode:
        """Start the head (retried like :meth:`add_node`, on fresh ports)."""
        def head_args() -> list[str]:
            # no dashboard, and its recorded address on a free port, not 8265: see dyrep_ray/distributed/state_api.py
            self.port, client, metrics, dashboard = free_ports(4)
            return ["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}"]
        return self._start_with_retries(head_args, self.head_cpus, is_head=True)

    def add_node(self, num_cpus: int = 1) -> RayNode:
        """Start a worker node (own raylet) joined to the head; returns once Ray lists it alive.

        Ray gives a joining raylet a fixed 30 s to register with the GCS; on an overloaded machine that can
        pass, so a failed start is killed (exactly its processes) and retried."""
        return self._start_with_retries(lambda: [f"--address={self.address}"], num_cpus, is_head=False)

    def _start_with_retries(self, role_args, num_cpus: int, is_head: bool) -> RayNode:
        for attempt in range(1, NODE_START_ATTEMPTS + 1):
            try:
                return self._start_node(role_args(), num_cpus, is_head=is_head)
            except RuntimeError:
                failed = self.nodes[-1]
                survivors = kill_pids(failed.pids)
                failed.killed = True
                if survivors or attempt == NODE_START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start_node(self, role_args: list[str], num_cpus: int, is_head: bool) -> RayNode:
        temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
        cmd = ["ray", "start", *role_args, f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
               "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        node = RayNode(temp_dir=temp_dir, num_cpus=num_cpus, pgid=proc.pid, is_head=is_head)
        self.nodes.append(node)  # before waiting: a failed start is still torn down
        try:
            out, _ = proc.communicate(timeout=NODE_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"ray start did not return within {NODE_START_TIMEOUT_S}s:\n{out[-3000:]}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed (rc {proc.returncode}):\n{out[-3000:]}")
        node.node_id = self._node_id_of(node)
        self.wait_for_nodes(lambda ids: node.node_id in ids, f"node {node.node_id[:8]} to join")
        return node

    @staticmethod
    def _node_id_of(node: RayNode) -> str:
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet found for the node in {node.temp_dir}")
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
        raise RuntimeError(f"raylet {pid} has no --node_id argument")

    def worker_nodes(self, alive_only: bool = True) -> list[RayNode]:
        return [n for n in self.nodes if not n.is_head and not (alive_only and n.killed)]

    def kill_node(self, node: RayNode) -> None:
        """SIGKILL the node's raylet and everything on it (workers, agents, object store): a lost machine."""
        assert not node.is_head, "killing the head ends the cluster; kill worker nodes"
        survivors = kill_pids(node.pids)
        node.killed = True
        if survivors:
            raise RuntimeError(f"processes of node {node.node_id[:8]} survived SIGKILL: {survivors}")

    def drain_node(self, node_id: str, deadline_s: int, reason: str = DRAIN_REASON_PREEMPTION) -> float:
        """Ray's real drain (what a spot reclaim notice triggers): the GCS marks the node draining with a
        deadline; as in the cloud, the caller kills the node when the deadline has passed.  Returns the wall
        time at which the GCS accepted the drain (its ``DrainNode`` RPC returned, in a GCS client subprocess:
        the same call as ``ray drain-node``, without the CLI's start-up in the figure)."""
        done = subprocess.run([sys.executable, "-c", _DRAIN_SCRIPT, self.address, node_id, reason,
                               str(deadline_s)], env=self.env, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"draining node {node_id[:8]} failed (rc {done.returncode}): {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        return float(done.stdout.strip().splitlines()[-1])

    def train_worker_pids(self, node: RayNode) -> list[int]:
        """The Ray Train worker processes on ``node`` (Ray titles them ``ray::RayTrainWorker...``)."""
        return [p for p in node.pids() if "RayTrainWorker" in proc_text(p, "cmdline") and alive([p])]

    # ------------------------------------------------------------ inspection
    def node_table(self) -> list[dict]:
        """Ray's node table (node id, alive, CPUs), read by a short GCS client subprocess."""
        done = subprocess.run([sys.executable, "-c", _NODE_TABLE_SCRIPT, self.address], env=self.env,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"reading the node table failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.node_table() if n["alive"]}

    def wait_for_nodes(self, predicate, what: str, timeout: float = NODE_START_TIMEOUT_S) -> set[str]:
        deadline = time.monotonic() + timeout
        ids: set[str] = set()
        while time.monotonic() < deadline:
            ids = self.alive_node_ids()
            if predicate(ids):
                return ids
            time.sleep(NODE_WAIT_POLL_S)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; alive nodes: {sorted(ids)}")

    # --------------------------------------------------------------- teardown
    def teardown(self) -> list[int]:
        """Kill every process of every node (workers first, the head last); returns the survivors."""
        survivors = []
        for node in sorted(self.nodes, key=lambda n: n.is_head):
            survivors += kill_pids(node.pids, first_signal=signal.SIGKILL if not node.is_head else signal.SIGTERM,
                                   grace=KILL_GRACE_S if not node.is_head else HEAD_STOP_GRACE_S)
        survivors += kill_pids(lambda: tree_pids(set(), markers=tuple(n.temp_dir for n in self.nodes)))
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        return sorted(set(survivors))


# Runs in a subprocess so this test process never opens a Ray connection of its own.
_NODE_TABLE_SCRIPT = r"""
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
client = GcsClient(address=sys.argv[1])
rows = []
for node_id, info in client.get_all_node_info(timeout=30).items():
    rows.append({"node_id": node_id.hex(), "alive": info.state == GcsNodeInfo.ALIVE,
                 "cpus": dict(info.resources_total).get("CPU", 0)})
print(json.dumps(rows))
"""


_DRAIN_SCRIPT = r"""
import sys, time
from ray._raylet import GcsClient
from ray.core.generated import autoscaler_pb2
address, node_id, reason, deadline_s = sys.argv[1:5]
client = GcsClient(address=address)
accepted, message = client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(reason),
                                      "dyrep-ray test preemption", int(time.time() * 1000) + int(deadline_s) * 1000)
if not accepted:
    sys.exit(f"drain not accepted: {message}")
print(f"{time.time():.3f}")
"""


# --------------------------------------------------------------------- callbacks for runs on such a cluster
class StepLog(TrainerCallback):
    """Rank 0 appends ``time world_size global_step`` after every step: the run's workers-over-time timeline
    and, around a restart, how many steps were redone."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, trainer, epoch, step, loss) -> None:
        if trainer.ctx.rank == 0:  # the process id tells a restart (a new worker group) from a step
            with open(self.path, "a") as f:
                f.write(f"{time.time():.3f} {trainer.ctx.world_size} {trainer.state.global_step} {os.getpid()}\n")


class StepDelay(TrainerCallback):
    """Every rank sleeps ``seconds`` after each step (``single_seconds`` on one worker): a tiny run lasts long
    enough for nodes to come and go."""

    def __init__(self, seconds: float, single_seconds: float | None = None):
        self.seconds, self.single_seconds = seconds, single_seconds

    def on_step_end(self, trainer, epoch, step, loss) -> None:
        single = trainer.ctx.world_size == 1 and self.single_seconds is not None
        time.sleep(self.single_seconds if single else self.seconds)


class StepGate(TrainerCallback):
    """Every rank waits after global step ``step`` until ``marker`` exists: the run cannot end before the test
    has done what it needed a running job for."""

    def __init__(self, step: int, marker: str, poll_s: float = 0.2):
        self.step, self.marker, self.poll_s = step, marker, poll_s

    def on_step_end(self, trainer, epoch, step, loss) -> None:
        while trainer.state.global_step >= self.step and not Path(self.marker).exists():
            time.sleep(self.poll_s)


def read_step_log(path) -> list[tuple[float, int, int]]:
    if not Path(path).exists():
        return []
    return [(t, world, step) for t, world, step, _ in read_step_log_pids(path)]


def read_step_log_pids(path) -> list[tuple[float, int, int, int]]:
    """:func:`read_step_log` with rank 0's process id (a new one after every restart)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        t, world, step, pid = line.split()
        rows.append((float(t), int(world), int(step), int(pid)))
    return rows


def first_step_after(path, t: float) -> tuple[float, int, int] | None:
    """The first step (time, world size, global step) of the first worker group started after wall time ``t``."""
    rows = read_step_log_pids(path)
    old = {pid for when, _, _, pid in rows if when <= t}
    return next(((when, world, step) for when, world, step, pid in rows if when > t and pid not in old), None)


def steps_redone(log: list[tuple[float, int, int]]) -> list[int]:
    """For every restart in a step log (the global step going back), how many completed steps were redone."""
    redone, high = [], -1
    for _, _, step in log:
        if high >= 0 and step <= high:
            redone.append(high - step + 1)
            high = step
        high = max(high, step)
    return redone


def workers_timeline(log: list[tuple[float, int, int]]) -> list[tuple[float, int]]:
    """(seconds since the first step, world size) at the first step and at every change of world size."""
    if not log:
        return []
    t0, out = log[0][0], []
    for t, world, _ in log:
        if not out or out[-1][1] != world:
            out.append((round(t - t0, 1), world))
    return out
