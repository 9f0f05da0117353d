"""The run-directory package imports neither torch nor Ray: ``report``, ``compare`` and the CLI's checks read run
directories through it, and a top-level torch/Ray import in any of its modules would make them slow again."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import dyrep_ray.rundir

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")
_PROBE = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def rundir_modules() -> list[str]:
    return ["dyrep_ray.rundir"] + [f"dyrep_ray.rundir.{info.name}"
                                   for info in pkgutil.iter_modules(dyrep_ray.rundir.__path__)]


def test_rundir_package_lists_its_modules():
    assert set(rundir_modules()) >= {"dyrep_ray.rundir", "dyrep_ray.rundir.layout", "dyrep_ray.rundir.storage",
                                     "dyrep_ray.rundir.files", "dyrep_ray.rundir.checkpoints",
                                     "dyrep_ray.rundir.lock"}


def test_rundir_modules_import_neither_torch_nor_ray():
    loaded = {}
    for module in rundir_modules():  # one fresh interpreter each: a module must be light on its own
        done = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, heavy=HEAVY)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        loaded[module] = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {module: [] for module in loaded}
