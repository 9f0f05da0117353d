"""The CLI starts fast: ``--help``, ``report``, ``compare`` and config errors import neither torch nor Ray.

Each command runs through :func:`dyrep_ray.cli.main` in a fresh interpreter, which then lists the heavy modules
it loaded.  The modules named in :data:`TORCH_FREE_MODULES` are the ones that path needs; importing any of them
alone must not load torch or Ray either (so a future top-level import there is caught at its source).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyrep_ray import cli
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from tests.helpers import LOCAL_TINY

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "torchvision", "timm", "mlflow", "tensorboard")
#: Modules the fast paths import; each must stay free of torch and Ray at import time.
TORCH_FREE_MODULES = (
    "dyrep_ray.cli",
    "dyrep_ray.errors",
    "dyrep_ray.limits",
    "dyrep_ray.package_data",
    "dyrep_ray.engine.config",
    "dyrep_ray.rundir.layout",
    "dyrep_ray.rundir.files",
    "dyrep_ray.rundir.storage",
    "dyrep_ray.rundir.checkpoints",
    "dyrep_ray.rundir.lock",
    "dyrep_ray.report.arguments",
    "dyrep_ray.report.commands",
    "dyrep_ray.report.compare",
    "dyrep_ray.report.figures",
    "dyrep_ray.report.history",
    "dyrep_ray.report.markdown",
    "dyrep_ray.report.render",
    "dyrep_ray.report.runs",
    "dyrep_ray.export.commands",
    "dyrep_ray.tune.commands",
    "dyrep_ray.tracking",
)
SUBPROCESS_TIMEOUT_S = 120

_PROBE = """
import json, sys
from dyrep_ray import cli
try:
    rc = cli.main({argv!r})
except SystemExit as exc:  # argparse's --help
    rc = exc.code
print(json.dumps({{"rc": rc, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def run_cli_probe(argv: list[str]) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv, heavy=HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fast_cli") / "run"
    cfg = load_config(None, LOCAL_TINY)
    train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))
    return run_dir


def test_help_and_config_errors_import_neither_torch_nor_ray():
    probe, out = run_cli_probe(["--help"])
    assert probe == {"rc": 0, "heavy": []}, out
    assert all(name in out for name in ("train", *cli.COMMAND_MODULES)), out  # every command is listed
    probe, out = run_cli_probe(["train", "--set", "bogus=1"])
    assert probe == {"rc": 2, "heavy": []}, out
    assert "unknown config key 'bogus'" in out
    probe, out = run_cli_probe(["tune", "--help"])
    assert probe == {"rc": 0, "heavy": []}, out


def test_report_and_compare_import_neither_torch_nor_ray(tiny_run, tmp_path):
    probe, out = run_cli_probe(["report", str(tiny_run), "--out", str(tmp_path / "report")])
    assert probe == {"rc": 0, "heavy": []}, out
    assert any((tmp_path / "report").glob("*.png"))
    probe, out = run_cli_probe(["compare", str(tiny_run), "--out", str(tmp_path / "compare")])
    assert probe == {"rc": 0, "heavy": []}, out
    assert any((tmp_path / "compare").iterdir())


@pytest.mark.parametrize("module", TORCH_FREE_MODULES)
def test_fast_path_modules_import_without_torch(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_command_table_matches_what_the_modules_register():
    """--help lists commands from cli.COMMAND_MODULES without importing them: the table must not drift."""
    import argparse
    import importlib

    for name, (module_name, help_text) in cli.COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module_name).register(sub, cli._add_common)
        helps = {action.dest: action.help for action in sub._choices_actions}
        assert helps.get(name) == help_text, (name, helps)
        full = cli.build_parser([name])
        assert full.parse_args([name, *_required_args(name)]).func.__module__ == module_name


def _required_args(name: str) -> list[str]:
    return {"convert": ["run"], "eval": ["w.safetensors"], "report": ["run"], "compare": ["a"],
            "tune": [], "prepare": ["synthetic", "--out", "x"]}.get(name, [])
