"""The shipped experiment configs and sweeps are found from an installed wheel, not only from a checkout.

Builds the wheel from a copy of the sources (offline, no build isolation), installs it with ``--target`` into an
empty folder and runs a fresh interpreter there, in an empty working directory, with only that folder in front
of ``sys.path``: whatever the package reads must come out of the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dyrep_ray.engine.config import load_config
from dyrep_ray.package_data import shipped_experiment
from dyrep_ray.tune.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 240

_PROBE = """
import contextlib, io, json, sys
from pathlib import Path
import dyrep_ray
from dyrep_ray import cli
from dyrep_ray.package_data import shipped_experiment
from dyrep_ray.tune.spec import load_sweep

demo = load_sweep("experiments/tune/demo.yaml", ["config.epochs=2"])
Path("mine.yaml").write_text("base: experiments/cifar10_vgg16.yaml\\nsearch_space: {lr: {uniform: [0.01, 0.1]}}\\n")
mine = load_sweep("mine.yaml")
errors = {}
for name in ("experiments/default.yaml", "experiments/nope.yaml"):  # a config error stops train before any work
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["train", "-c", name, "--set", "bogus_key=1"])
    errors[name] = [rc, err.getvalue()]
print(json.dumps({"train": errors, "package": dyrep_ray.__file__,
                  "default": str(shipped_experiment("experiments/default.yaml")),
                  "name": demo.name, "epochs": demo.base_config["epochs"], "model": demo.base_config["model"],
                  "lr": repr(demo.search_space["lr"]), "mine_dataset": mine.base_config["dataset"],
                  "heavy": [m for m in ("torch", "ray") if m in sys.modules]}))
"""


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=PIP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_shipped_experiment_names_only_files_under_experiments():
    assert shipped_experiment("experiments/default.yaml").read_text() == (REPO / "experiments/default.yaml").read_text()
    assert shipped_experiment("experiments/tune/demo.yaml").is_file()
    for name in ("experiments/nope.yaml", "experiments/../pyproject.toml", "pyproject.toml", "experiments",
                 "experiments/study/run.py"):
        assert shipped_experiment(name) is None, name


def test_sweep_base_falls_back_to_the_shipped_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither the sweep's folder nor the cwd holds experiments/
    sweep = tmp_path / "elsewhere" / "s.yaml"
    sweep.parent.mkdir()
    sweep.write_text(yaml.safe_dump({"base": "experiments/default.yaml",
                                     "search_space": {"lr": {"uniform": [0.01, 0.1]}}}))
    spec = load_sweep(sweep)
    assert spec.base_config == load_config(REPO / "experiments/default.yaml").to_dict()
    assert load_sweep("experiments/tune/demo.yaml").name == "demo"  # -c with the repo-relative name


def test_installed_wheel_loads_the_shipped_default_config_and_sweep(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "dyrep_ray", src / "dyrep_ray", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "experiments", src / "experiments", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "wheel"), str(src))
    wheels = list((tmp_path / "wheel").glob("dyrep_ray-*.whl"))
    assert len(wheels) == 1
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheels[0]))
    shutil.rmtree(src)  # nothing may be read from the sources any more

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(site) and Path(got["default"]).is_relative_to(site)
    demo = load_sweep(REPO / "experiments/tune/demo.yaml", ["config.epochs=2"])
    assert (got["name"], got["epochs"], got["model"]) == ("demo", 2, demo.base_config["model"])
    assert got["lr"] == repr(demo.search_space["lr"])
    assert got["mine_dataset"] == load_config(REPO / "experiments/cifar10_vgg16.yaml").dataset
    assert got["heavy"] == []
    # dyrep-ray train -c experiments/default.yaml reads the shipped file (it gets as far as the bad --set key) ...
    rc, err = got["train"]["experiments/default.yaml"]
    assert rc == 2 and "unknown config key 'bogus_key'" in err
    rc, err = got["train"]["experiments/nope.yaml"]  # ... where a name that is not shipped stops at the file
    assert rc == 2 and "'experiments/nope.yaml' does not exist" in err
