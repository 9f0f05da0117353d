"""The experiment configs and sweeps the package ships (the repo's ``experiments/*.yaml``, ``paper/``, ``tune/``).

Read through :mod:`importlib.resources`, so they are found wherever the package is installed (a wheel in
site-packages, an editable checkout); in the repo ``dyrep_ray/experiments`` links to ``experiments/``, and
``[tool.setuptools.package-data]`` copies its YAMLs into the wheel.  No torch, no Ray.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path, PurePosixPath

#: The folder name both in the repo root and inside the package; ``experiments/<x>.yaml`` names a shipped file.
EXPERIMENTS_DIR = "experiments"

YAML_SUFFIXES = (".yaml", ".yml")

_extracted = contextlib.ExitStack()  # files copied out of a zipped install, removed at exit
atexit.register(_extracted.close)


def shipped_experiment(name: str | PurePosixPath) -> Path | None:
    """The shipped file that ``experiments/<relative>`` names (e.g. ``experiments/tune/demo.yaml``), else None.

    Only relative YAML names under ``experiments/`` without ``..`` are looked up: nothing else is shipped.
    """
    path = PurePosixPath(str(name).replace("\\", "/"))
    parts = path.parts
    if len(parts) < 2 or parts[0] != EXPERIMENTS_DIR or ".." in parts or path.suffix not in YAML_SUFFIXES:
        return None
    node = resources.files("dyrep_ray").joinpath(*parts)
    if not node.is_file():
        return None
    if isinstance(node, Path):
        return node
    return _extracted.enter_context(resources.as_file(node))  # a zipped install: a real file for open()
