"""tests/scheduling.py: the xdist grouping of the suite itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scheduling import (
    OWN_CLUSTER_MODULES,
    RAY_SESSION_FIXTURES,
    RAY_SHARED_GROUP,
    RAY_SHARED_TESTS,
    claim_ray_session,
    group_errors,
    group_of,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shared_ray_tests_are_one_unit_and_other_tests_their_own():
    assert group_of("tests/test_train_ray.py::test_a") == RAY_SHARED_GROUP
    pbt = "tests/test_tune.py::test_pbt_exploit_continues_from_donor_structure"
    assert group_of(pbt) == group_of(f"{pbt}[x-1]") == RAY_SHARED_GROUP
    assert group_of("tests/test_tune.py::test_b") == "tests/test_tune.py::test_b"  # its other tests go anywhere
    assert group_of("tests/test_multinode.py::test_c") == "cluster:tests/test_multinode.py"
    assert group_of("tests/test_dbb.py::test_d[1-2]") == "tests/test_dbb.py::test_d[1-2]"


def test_a_ray_test_outside_the_listed_modules_is_named():
    errors = group_errors([("tests/test_dbb.py::test_x", ["tmp_path", "ray_session"]),
                           ("tests/test_dbb.py::test_y", ["cluster"]),
                           ("tests/test_train_ray.py::test_z", ["ray_session"]),
                           ("tests/test_dbb.py::test_plain", ["tmp_path"])])
    assert len(errors) == 2
    assert "test_x uses ray_session" in errors[0] and "RAY_SHARED_TESTS" in errors[0]
    assert "test_y uses a module cluster" in errors[1] and "OWN_CLUSTER_MODULES" in errors[1]


@pytest.mark.parametrize("entry", sorted(RAY_SHARED_TESTS | OWN_CLUSTER_MODULES))
def test_every_listed_test_exists_and_uses_what_it_is_listed_for(entry):
    module, _, function = entry.partition("::")
    text = (ROOT / module).read_text()
    if function:  # the test's own signature names the fixture
        signature = text[text.index(f"def {function}("):].split(")")[0]
        assert any(fixture in signature for fixture in RAY_SESSION_FIXTURES), entry
    else:
        uses = RAY_SESSION_FIXTURES if entry in RAY_SHARED_TESTS else ("def cluster(",)
        assert any(fixture in text for fixture in uses), (entry, uses)


def test_the_session_scenario_fixtures_run_on_the_shared_ray_instance():
    text = (ROOT / "tests" / "conftest.py").read_text()
    for fixture in RAY_SESSION_FIXTURES[1:]:
        signature = text[text.index(f"def {fixture}("):].split(")")[0]
        assert any(other in signature for other in RAY_SESSION_FIXTURES if other != fixture), fixture


def test_a_second_worker_claiming_the_ray_session_fails(tmp_path, monkeypatch):
    for worker in ("gw0", "gw0", "gw1"):
        (tmp_path / f"popen-{worker}").mkdir(exist_ok=True)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    claim_ray_session(tmp_path / "popen-gw0")
    claim_ray_session(tmp_path / "popen-gw0")  # the same worker again: fine
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    with pytest.raises(pytest.UsageError, match="workers gw0 and gw1"):
        claim_ray_session(tmp_path / "popen-gw1")
