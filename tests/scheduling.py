"""Which xdist worker runs what: tests that share one Ray instance or one cluster run on one worker, in order.

The suite runs on two pytest-xdist workers (pyproject addopts ``-n 2``): the single-threaded unit tests use the
core a Ray integration test leaves idle while it waits on Ray. xdist's own ``--dist loadgroup`` cannot be used:
it tags a test's group by rewriting ``item._nodeid``, which pytest 9.2 no longer reads, so its groups silently
fall apart. The scheduler below groups by node id instead (by module or test function: xdist's controller has
node ids only, not fixtures); ``check_groups`` fails the run when a test's fixtures and its group disagree, so
the lists cannot go stale.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest

#: Tests on the pytest process's shared Ray instance (the ``ray_session`` fixture), by module or, in a module of
#: mostly other tests, by test function: one worker runs them all, so the suite starts one Ray instance and one
#: ``ray_reference`` run, not one per worker.
RAY_SHARED_TESTS = frozenset({
    "tests/test_midepoch_ray.py", "tests/test_ray_data_ingest.py", "tests/test_storage_s3.py",
    "tests/test_train_parquet.py", "tests/test_train_ray.py",
    "tests/test_state_api.py::test_the_shared_test_instance_records_its_state_api_on_a_free_port_not_8265",
    "tests/test_console.py::test_verbose_shows_rays_lines", "tests/test_console.py::test_tune_console",
    "tests/test_fault_handling.py::test_more_workers_than_cluster_cpus",
    "tests/test_tracking.py::test_ray_run_tracks_from_rank_0_only",
    "tests/test_tune.py::test_pbt_exploit_continues_from_donor_structure",
    "tests/test_tune.py::test_errored_trial_does_not_stop_the_sweep",
    "tests/test_untrusted_input.py::test_real_sweep_resume_refuses_replaced_tuner_pkl_and_resumes_untouched",
})
RAY_SHARED_GROUP = "ray-shared"
#: Fixtures of tests/conftest.py that run on the shared Ray instance (``ray_session`` and the session scenarios
#: built on it): a test naming one of them is on that instance.
RAY_SESSION_FIXTURES = ("ray_session", "ray_reference", "ray_worker_kills", "errored_sweep",
                        "driver_killed_rerun")
#: Modules whose tests share a module-scoped cluster of their own (``ray start`` processes): one group each.
OWN_CLUSTER_MODULES = frozenset({"tests/test_multinode.py"})
OWN_CLUSTER_FIXTURE = "cluster"


def group_of(nodeid: str) -> str:
    """The scheduling unit of a test: its group, or the test itself (any worker may run it)."""
    module, _, rest = nodeid.partition("::")
    function = rest.split("::")[-1].split("[")[0]
    if module in RAY_SHARED_TESTS or f"{module}::{function}" in RAY_SHARED_TESTS:
        return RAY_SHARED_GROUP
    if module in OWN_CLUSTER_MODULES:
        return f"cluster:{module}"
    return nodeid


def group_errors(tests: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """One line per ``(node id, fixture names)`` whose fixtures need a group its module does not give it."""
    errors = []
    for nodeid, fixtures in tests:
        fixtures, group = set(fixtures), group_of(nodeid)
        if "ray_session" in fixtures and group != RAY_SHARED_GROUP:
            errors.append(f"{nodeid} uses ray_session: add it (or its module) to RAY_SHARED_TESTS in {__name__}")
        if OWN_CLUSTER_FIXTURE in fixtures and not group.startswith("cluster:"):
            errors.append(f"{nodeid} uses a module cluster: add its module to OWN_CLUSTER_MODULES in {__name__}")
    return errors


def check_groups(items: list[pytest.Item]) -> None:
    errors = group_errors((item.nodeid, item.fixturenames) for item in items)
    if errors:
        raise pytest.UsageError("; ".join(errors))


def claim_ray_session(basetemp: Path) -> None:
    """Fail unless this is the only xdist worker of the run to start the shared Ray instance.

    xdist gives each worker ``<run temp>/popen-gwN`` as its base temp dir; the first worker to start the instance
    writes its id into the run temp dir, and any other worker that tries fails (the grouping broke).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # one process (-n 0): nothing to share
        return
    claim = basetemp.parent / "ray-session-worker"
    try:
        with open(claim, "x") as f:
            f.write(worker)
    except FileExistsError:
        owner = claim.read_text()
        if owner != worker:
            raise pytest.UsageError(f"the shared Ray instance was started on xdist workers {owner} and {worker}: "
                                    f"the grouping in {__name__} is broken") from None


def make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduler with :func:`group_of` as the scope: each group is one unit of work, biggest first."""
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return RayGroupScheduling(config, log)
