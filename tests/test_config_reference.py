"""docs/configuration.md is the generator's output for today's schema (pure Python: no torch, no Ray)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from dyrep_ray.engine.config import TrainConfig
from dyrep_ray.engine.config_reference import COMMAND, render

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date() -> None:
    assert REFERENCE.is_file(), f"{REFERENCE} is missing; generate it with: {COMMAND}"
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is stale (the config schema changed); regenerate it with: {COMMAND}"
    )


def test_generator_command_prints_the_reference() -> None:
    done = subprocess.run([sys.executable, "-m", "dyrep_ray.engine.config_reference"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == render()


def test_reference_has_one_row_per_key_with_its_facts() -> None:
    text = render()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert list(rows) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert rows["lr"] == "| `lr` | float | `0.05` | > 0 | may change | peak learning rate |"
    assert "`sgd`, `adamw`" in rows["opt"] and "| fixed |" in rows["opt"]
    assert "| int or null | `null` | in [1, 100000] | fixed |" in rows["num_classes"]
    assert "2 numbers, each in [0, 1)" in rows["opt_betas"]
    assert "`log_interval`" in text.split("## Removed keys")[1] and "log_interval" not in rows
    rules = text.split("## Rules across keys")[1].split("## Removed keys")[0]
    assert "needs data_dir" in rules and "`DATASET_NUM_CLASSES`: `cifar10`: 10, `cifar100`: 100" in rules
