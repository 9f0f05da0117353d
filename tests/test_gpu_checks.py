"""``python -m bench.gpu_checks`` in its CPU form: every check that has one runs (the CUDA-only one says SKIP
with its reason), one line each, exit 0.  The same command on a GPU runs them all on the device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import gpu_checks

REPO = Path(__file__).resolve().parents[1]


def test_cpu_form_prints_one_line_per_check_and_passes():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_checks", "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    by_name = {line.split(" ", 2)[1].rstrip(":"): line for line in lines}
    assert list(by_name) == list(gpu_checks.CHECKS), lines
    expected = {name: "PASS" for name in gpu_checks.CHECKS} | {"tf32_agreement": "SKIP"}
    assert {name: line.split(" ", 1)[0] for name, line in by_name.items()} == expected, lines
    assert "only on CUDA" in by_name["tf32_agreement"]
    assert proc.stdout.splitlines()[0] == "device: cpu"


def test_asking_for_cuda_without_one_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(gpu_checks.torch.cuda, "is_available", lambda: False)
    assert gpu_checks.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "no CUDA device: run with --device cpu (or auto)"
    assert gpu_checks.main(["--device", "cpu", "--only", "nope"]) == 2
