"""A real local multi-node Ray cluster under a run: placement across nodes, a node SIGKILLed mid-epoch (fixed
and elastic workers), a real drain (preemption).  One cluster (a 1-CPU head + 1-CPU worker nodes, so two
workers must sit on two nodes) is shared by every test of this module; drivers run as subprocesses, so the
shared Ray instance of conftest is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.global_step import epoch_sample_counts
from dyrep_ray.engine.loop import Trainer
from dyrep_ray.rundir.storage import as_storage
from tests.helpers import RESUME_ATOL, final_model, max_abs_diff, run_metrics
from tests.multinode import (
    LocalRayCluster,
    first_step_after,
    read_step_log,
    steps_redone,
    workers_timeline,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RUN_TIMEOUT_S = 600
WAIT_TIMEOUT_S = 300
POLL_S = 0.5
#: Seconds Ray Train waits for a worker group's placement group before it tries again (the runs' config)
WORKER_GROUP_START_TIMEOUT_S = 10
# 128 images / global batch 64 = 2 steps per epoch at any worker count; adjust after every epoch.
BASE = ["synthetic_train_size=128", "synthetic_val_size=64", "global_batch_size=64", "dyrep_recal_bn_iters=2",
        "dyrep_adjust_interval=1", "checkpoint_every_steps=1", "max_failures=3",
        f"worker_group_start_timeout_s={WORKER_GROUP_START_TIMEOUT_S}"]
ELASTIC_VAL_LOSS_ATOL = 1e-4
RESIZE_INTERVAL_S = "3"  # elastic: Ray looks for capacity this often (default 60 s)
# Recommended for spot clusters (docs/cluster.md): the GCS declares a lost node dead after 3 missed 1 s checks
# (Ray's default: 5 missed 3 s checks); read by the head's GCS
FAST_NODE_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
CHAOS_EPOCHS = 11  # with 1-3 s per step, long enough for every disturbance; the last step waits for the test
DRAIN_DEADLINE_S = 10
DRAIN_CHECKPOINT_S = 10

DRIVER = """
import json, sys
from dyrep_ray.distributed.trainer import run_distributed
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.faults import SleepAt
from tests.multinode import StepDelay, StepGate, StepLog
args = json.loads(sys.argv[1])
callbacks = [StepLog(args["step_log"])]
if args.get("delay"):
    callbacks.append(StepDelay(args["delay"], args.get("single_delay")))
if args.get("gate"):
    callbacks.append(StepGate(args["gate"]["step"], args["gate"]["marker"]))
if args.get("stall"):
    callbacks.append(SleepAt(epoch=args["stall"]["epoch"], seconds=args["stall"]["seconds"],
                             marker=args["stall"]["marker"]))
run_distributed(load_config(None, args["overrides"]), args["out"], args["name"], address=args["address"],
                callbacks=callbacks)
"""


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalRayCluster(head_cpus=1, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                                "RAY_DEDUP_LOGS": "0", **FAST_NODE_HEALTH})
    try:
        cluster.start()
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        survivors = cluster.teardown()
        assert not survivors, f"processes of the test cluster survived teardown: {survivors}"


def start_driver(cluster: LocalRayCluster, out: Path, name: str, overrides: list[str], **extra) -> subprocess.Popen:
    args = {"address": cluster.address, "out": str(out), "name": name, "overrides": overrides,
            "step_log": str(out / f"{name}.steps"), **extra}
    env = {**cluster.env, "DYREP_RAY_ELASTIC_RESIZE_INTERVAL_S": RESIZE_INTERVAL_S}
    log = open(out / f"{name}.log", "w")  # noqa: SIM115  (closed with the process, in finish())
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, name: str) -> None:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    assert rc == 0, f"driver {name} ended with {rc}:\n{(out / f'{name}.log').read_text()[-6000:]}"


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = WAIT_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended (rc {proc.returncode}) before {what}")
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def mid_epoch_checkpoint(run_dir: Path, epoch: int, global_step: int) -> Path | None:
    path = run_dir / f"checkpoint_epoch{epoch:04d}_step{global_step:06d}"
    return path if (path / "MANIFEST.json").exists() else None


class LocalReference(threading.Thread):
    """Train ``overrides`` in this process (one torch thread, as a 1-CPU Ray worker) into ``run_dir``."""

    def __init__(self, overrides: list[str], run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.overrides, self.run_dir, self.failed = overrides, run_dir, ""

    def run(self) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            Trainer.from_config(load_config(None, self.overrides), LocalContext(torch.device("cpu"),
                                                                                 self.run_dir)).fit()
        except Exception as exc:  # noqa: BLE001 - reported by the test after join()
            self.failed = repr(exc)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def node_killed(cluster, tmp_path_factory):
    """A fixed 2-worker run whose worker node is SIGKILLed in epoch 2 (after the first growth, after a mid-epoch
    checkpoint) and replaced 5 s later, next to its uninterrupted reference: the same config trained in this
    process meanwhile (with ``global_batch_size`` one worker ends within ``RESUME_ATOL`` of two:
    tests/test_global_batch.py).  Returns the output directory (runs ``nodekill`` and ``ref``) and whether the
    driver was still waiting for capacity 5 s after the kill."""
    out = tmp_path_factory.mktemp("mn")
    overrides = [*BASE, "epochs=3", "workers=2"]
    reference = LocalReference(overrides, out / "ref")
    reference.start()
    marker = out / "stall-off"
    node = cluster.worker_nodes()[-1]
    proc = start_driver(cluster, out, "nodekill", overrides,
                        stall={"epoch": 1, "seconds": 600, "marker": str(marker)})
    # epoch 2 (0-based 1) stalls after step 1 of 2; the checkpoint after that step is global step 3
    wait_for(lambda: mid_epoch_checkpoint(out / "nodekill", 1, 3), "the mid-epoch checkpoint of epoch 2", proc)
    assert run_metrics(out / "nodekill")[0]["events"], "no growth before the node loss"
    marker.write_text("the stall is over for restarted workers\n")
    cluster.kill_node(node)
    t_kill = time.monotonic()
    time.sleep(5.0)
    waited = proc.poll() is None
    cluster.add_node(num_cpus=1)
    finish(proc, out, "nodekill")
    print(f"node loss (fixed workers=2): recovered {time.monotonic() - t_kill:.0f}s after the kill")
    reference.join()
    assert not reference.failed, reference.failed
    return out, waited


def test_workers_are_placed_across_nodes(node_killed):
    out, _ = node_killed
    lines = run_metrics(out / "nodekill")
    nodes = lines[0]["rank_nodes"]  # the first worker group, before the node loss
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes  # one rank per node: the head and the worker node
    assert all(len(set(m["start_digests"])) == 1 for m in lines if "start_digests" in m)


def test_node_killed_mid_epoch_fixed_workers_wait_and_resume_bit_identical(node_killed):
    """Kill the worker node in epoch 2 (after the first growth, after a mid-epoch checkpoint); the fixed
    2-worker run waits for capacity, resumes when a new node joins, and ends with the reference weights."""
    out, waited = node_killed
    assert waited, "a fixed-size run must wait for capacity, not fail"
    ref_model, ref_ckpt = final_model(out / "ref")
    model, ckpt = final_model(out / "nodekill")
    assert ckpt.graph == ref_ckpt.graph
    assert [m["events"] for m in run_metrics(out / "nodekill")] == [m["events"] for m in run_metrics(out / "ref")]
    worst = max_abs_diff(ref_model.state_dict(), model.state_dict())
    assert worst <= RESUME_ATOL, worst
    lines = run_metrics(out / "nodekill")
    restarted = [m for m in lines if m.get("start_global_step", 0) > 0]
    assert restarted and restarted[0]["start_global_step"] == 3  # from the mid-epoch checkpoint
    assert len(set(restarted[0]["start_digests"])) == 1 and restarted[0]["world_size"] == 2
    redone = steps_redone(read_step_log(out / "nodekill.steps"))
    print(f"node loss: max |w - w_ref| = {worst:.3g}; steps redone after the restart {redone}")


def test_chaos_worker_killed_node_lost_node_added_node_drained_ends_as_one_process(cluster, tmp_path):
    """One elastic ``[1, 2]`` run, ``global_batch_size=64``, through every disturbance a spot cluster brings:
    a Ray Train worker process SIGKILLed, the worker node SIGKILLed (the run shrinks without waiting), a node
    added (it grows back), that node drained (preemption checkpoint, reclaimed at the deadline, a node added).
    It ends with the structure, events and final val loss of the same config trained in one process, every
    sample computed exactly once per epoch, at most the step in flight redone at each disturbance."""
    out = tmp_path
    overrides = [*BASE, f"epochs={CHAOS_EPOCHS}", "workers=[1,2]", "debug_sample_record=true",
                 "preemption_check_steps=1"]
    release = out / "release"
    # the same config in one process, trained while the cluster run mostly waits (steps sleep, recovery)
    one_worker = LocalReference(overrides, out / "one")
    one_worker.start()
    proc = start_driver(cluster, out, "chaos", overrides, delay=1.0, single_delay=3.0,
                        gate={"step": 2 * CHAOS_EPOCHS - 1, "marker": str(release)})
    log_path, run_dir = out / "chaos.steps", out / "chaos"
    seconds: dict[str, float] = {}

    def first_group_step_after(t: float, what: str, world: int | None = None) -> tuple[float, int, int]:
        row = wait_for(lambda: (r := first_step_after(log_path, t)) and (world is None or r[1] == world) and r,
                       what, proc)
        return row

    # 1. a Ray Train worker process dies (its node stays): the run restarts at 2 workers from the last step
    wait_for(lambda: mid_epoch_checkpoint(run_dir, 1, 3), "the mid-epoch checkpoint of epoch 2", proc)
    assert run_metrics(run_dir)[0]["events"], "no growth before the disturbances"
    node = cluster.worker_nodes()[-1]
    pid = wait_for(lambda: cluster.train_worker_pids(node), "a Ray Train worker on the worker node", proc)[0]
    t = time.time()
    os.kill(pid, signal.SIGKILL)
    when, world, _ = first_group_step_after(t, "a step after the worker process was killed")
    seconds["worker SIGKILLed -> first step of the restarted group"] = when - t
    assert world == 2, "the node is still there: the run restarts at 2 workers"
    # 2. the worker node dies: the run shrinks to the head's worker without waiting for capacity
    t = time.time()
    cluster.kill_node(node)
    when, world, _ = first_group_step_after(t, "a step after the node was killed")
    seconds["node SIGKILLed -> first step on the remaining worker"] = when - t
    assert world == 1, world
    # 3. a node joins: the run grows back to 2 workers
    node = cluster.add_node(num_cpus=1)
    t = time.time()
    when, _, _ = first_group_step_after(t, "a step on 2 workers after a node joined", world=2)
    seconds["node joined -> first step on 2 workers"] = when - t
    # 4. the new node is drained (a spot notice): a checkpoint, the node reclaimed at the deadline, a node added.
    # Right after an epoch's last step, so the notice is seen mid-epoch and the checkpoint is a mid-epoch one
    # (a resume from an epoch's last step: tests/test_global_batch.py, without Ray).
    wait_for(lambda: any(t > when and w == 2 and s % 2 == 0 for t, w, s in read_step_log(log_path)),
             "an epoch's last step on 2 workers", proc)
    t_drain = cluster.drain_node(node.node_id, deadline_s=DRAIN_DEADLINE_S)
    written: dict[str, tuple[float, int]] = {}  # checkpoint -> (commit time, global step), committed since
    while time.time() < t_drain + DRAIN_DEADLINE_S:
        for path in run_dir.glob("checkpoint_epoch*_step*"):
            manifest = path / "MANIFEST.json"
            with contextlib.suppress(OSError, ValueError):
                if manifest.exists() and manifest.stat().st_mtime > t_drain and path.name not in written:
                    written[path.name] = (manifest.stat().st_mtime,
                                          json.loads((path / "meta.json").read_text())["global_step"])
        time.sleep(0.1)
    killed_at = time.time()
    cluster.kill_node(node)  # the cloud reclaims the node at the deadline
    assert written, "no checkpoint committed between the drain and its deadline"
    committed_at, ckpt_step = max(written.values())  # ranks train no further than the preemption checkpoint
    seconds["drain accepted by the GCS -> preemption checkpoint committed"] = committed_at - t_drain
    node = cluster.add_node(num_cpus=1)
    when, world, first_step = first_group_step_after(killed_at, "a step after the drained node was reclaimed")
    seconds["drained node reclaimed -> first step of the restarted group"] = when - killed_at
    assert first_step == ckpt_step + 1, (first_step, ckpt_step)  # resumed from the preemption checkpoint
    reached = max(s for t, _, s in read_step_log(log_path) if t < killed_at)
    assert reached - ckpt_step <= 1, (reached, ckpt_step)  # at most the step in flight at the notice
    if world == 1:  # restarted before the new node joined: it grows into it
        first_group_step_after(when, "a step on 2 workers after the last node joined", world=2)
    release.write_text("every disturbance is done\n")
    finish(proc, out, "chaos")
    for what, value in seconds.items():
        print(f"chaos: {what}: {value:.1f}s")
    log = read_step_log(log_path)
    timeline = workers_timeline(log)
    print(f"chaos [1,2] workers over time (s, workers): {timeline}")
    assert [w for _, w in timeline][:3] == [2, 1, 2] and timeline[-1][1] == 2, timeline
    assert "preemption: checkpoint" in (out / "chaos.log").read_text()
    lines = run_metrics(run_dir)
    assert [m["epoch"] for m in lines] == list(range(1, CHAOS_EPOCHS + 1))
    for m in lines:
        if "start_digests" in m:  # every (re)start and resize: all replicas identical
            assert len(set(m["start_digests"])) == 1 and len(m["start_digests"]) == m["world_size"]
    lost = steps_redone(log)
    assert all(n <= 1 + 1 for n in lost), lost  # checkpoint every step: at most the step(s) in flight
    # global_batch_size: the run decides and ends as one worker would (the same config in this process;
    # tests/test_global_batch.py shows 1 and 2 workers bit-identical)
    assert any(m["events"] for m in lines), "no structure change to compare"
    one_worker.join()
    assert not one_worker.failed, one_worker.failed
    one = one_worker.run_dir
    assert (run_dir / "structure.json").read_text() == (one / "structure.json").read_text()
    one_lines = run_metrics(one)
    assert [m["events"] for m in lines] == [m["events"] for m in one_lines]
    gap = abs(lines[-1]["val_loss"] - one_lines[-1]["val_loss"])
    print(f"chaos vs one worker: final val loss {lines[-1]['val_loss']:.6f} vs {one_lines[-1]['val_loss']:.6f}")
    assert gap <= ELASTIC_VAL_LOSS_ATOL, gap
    storage = as_storage(run_dir)
    for epoch in range(CHAOS_EPOCHS):  # every sample once per epoch, through the restarts and resizes
        counts = epoch_sample_counts(storage, epoch)
        assert sorted(counts) == list(range(128)) and set(counts.values()) == {1}, epoch
    # A node loss costs no more than this run's plain worker restart (same machine, same load) plus one worker-group
    # start timeout: a restart sized for the dead node's CPUs would wait out that timeout and more
    # (docs/cluster.md, "Recovery in seconds"); seconds alone would measure how busy the machine is.
    restart = seconds["worker SIGKILLed -> first step of the restarted group"]
    assert seconds["node SIGKILLed -> first step on the remaining worker"] <= restart + WORKER_GROUP_START_TIMEOUT_S
    assert seconds["drain accepted by the GCS -> preemption checkpoint committed"] <= DRAIN_CHECKPOINT_S
