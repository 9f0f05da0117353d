"""The GPU suite (``python -m bench --gpu``) in its ``--dry-run`` form on CPU: every code path runs — eager and
compiled steps of plain and grown models, the recompile after an adjust, 1-device DDP — so the suite is known to
work before a GPU is lent.  The numbers of a dry run mean nothing; the structure and sanity of the result do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The command docs/benchmarks.md documents, end to end, in a subprocess (its own torch and dynamo state)."""
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--dry-run", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def dry_run_result(dry_run):
    return dry_run[0]


def test_dry_run_measures_every_variant(dry_run_result):
    r = dry_run_result
    assert r["dry_run"] is True and r["model"] == gpu.DRY_RUN.model
    variants = {"plain"} | {f"grown_{t}" for t in r["block_types"]}
    assert r["block_types"] == ["bn", "online"]
    for section in ("eager", "compiled"):
        assert set(r[section]) == variants
        for name, entry in r[section].items():
            assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] > 0, (section, name)
            assert entry["step_over_plain"] > 0
    assert r["eager"]["plain"]["step_over_plain"] == pytest.approx(1.0)
    for name, entry in r["compiled"].items():
        assert entry["first_step_s"] > 0 and entry["speedup_over_eager"] > 0, name
    assert set(r["adjust_recompile"]) == set(r["block_types"])
    for entry in r["adjust_recompile"].values():
        assert entry["recompile_first_step_s"] > 0 and entry["next_step_s"] > 0
    assert r["ddp"]["backend"] == "gloo" and r["ddp"]["ddp_over_bare"] > 0
    assert set(r["trainer_step"]) == {"bare_plain", "trainer_plain", "trainer_online"}
    assert r["trainer_step"]["bare_plain"]["step_over_bare_plain"] == pytest.approx(1.0)
    for name, entry in r["trainer_step"].items():
        assert math.isfinite(entry["images_per_s"]) and entry["images_per_s"] > 0, name
    table = gpu.markdown(r)
    assert "DRY RUN" in table and all(f"| {v} |" in table for v in (*variants, *r["trainer_step"]))


def test_grown_variants_really_hold_blocks():
    """The suite's grown model differs from plain exactly at the listed convs (else it would time plain twice)."""
    from dyrep_ray.models import build_model
    from dyrep_ray.rep.dbb import DiverseBranchBlock

    model = gpu.grow_with_bn_blocks(build_model(gpu.DRY_RUN.model, 10), gpu.DRY_RUN.grown_paths)
    grown = sorted(n for n, m in model.named_modules() if isinstance(m, DiverseBranchBlock))
    assert grown == sorted(gpu.DRY_RUN.grown_paths)


def test_gpu_flag_without_a_gpu_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --gpu would run the real suite")
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--dry-run" in lines[0], proc.stderr


def test_cli_dry_run_writes_json_and_prints_the_table(dry_run):
    data, stdout = dry_run
    assert data["dry_run"] is True and data["total_seconds"] > 0
    assert "| plain |" in stdout and "full results:" in stdout
