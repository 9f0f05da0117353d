"""experiments/study/run.py --quick: the seeds study's smoke test (real tiny --local runs, 1 seed)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

from dyrep_ray.engine.config import TrainConfig
from dyrep_ray.rundir.layout import CONFIG_FILE, METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "study" / "run.py"


def _study_module():
    spec = importlib.util.spec_from_file_location("study_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quick_study_runs_every_available_variant_and_tabulates_it(tmp_path):
    study = _study_module()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    available = [v for v in study.VARIANTS if not study.missing_keys(v, fields)]
    skipped = [v for v in study.VARIANTS if study.missing_keys(v, fields)]
    assert {"plain", "DyRep (original)"} <= {v.name for v in available}

    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in skipped:
        assert f"skipping variant {variant.name!r}" in done.stderr

    table = (out / study.STUDY_MD).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for variant in skipped:
        assert "skipped" in rows[variant.name]
    runs = list(csv.DictReader(io.StringIO((out / study.STUDY_CSV).read_text())))
    assert len(runs) == len(available)  # --quick: one seed each
    run_dirs = sorted((out / study.RUNS_DIR).iterdir())
    assert len(run_dirs) == len(available)
    for row in runs:
        variant = next(v for v in available if row["run"].startswith(v.name + " / seed"))
        run_dir = out / study.RUNS_DIR / study.run_dir_name(variant, study.FIRST_SEED)
        config = json.loads((run_dir / CONFIG_FILE).read_text())
        assert {k: config[k] for k in variant.keys} == variant.keys
        assert config["epochs"] == study.QUICK_BUDGET["epochs"]
        metrics = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
        best = max(m["val_top1"] for m in metrics)
        assert float(row["best_top1"]) == best
        # one seed: the table shows the value itself
        assert f"{best:.2f} (1 seed)" in rows[variant.name]
