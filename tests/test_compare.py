"""``dyrep-ray compare``: the paper-style table read from real (tiny, --local) run directories."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyrep_ray.cli import main
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.report.compare import COMPARE_CSV, COMPARE_MD, COMPARE_PNG, compare_markdown, compare_runs
from dyrep_ray.rundir.layout import CONFIG_FILE, DEPLOYED_SIDECAR, METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = ["epochs=2", "synthetic_train_size=128", "synthetic_val_size=64", "batch_size=32", "dyrep_recal_bn_iters=2",
        "dyrep_adjust_interval=1", "dyrep_grow_topk=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_runs")
    dirs = {}
    for name, mode in (("plain", "dyrep=false"), ("dyrep", "dyrep=true")):
        cfg = load_config(None, TINY + [mode])
        dirs[name] = root / name
        train(cfg, LocalContext(torch.device("cpu"), dirs[name], cfg.keep_checkpoints))
    return dirs


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _expected(run_dir: Path) -> dict:
    rows = _metrics(run_dir)
    best = max(rows, key=lambda r: r["val_top1"])
    meta = json.loads(sorted(run_dir.glob("checkpoint_*"))[-1].joinpath("meta.json").read_text())
    return {"epochs": len(rows), "best_top1": best["val_top1"], "best_epoch": best["epoch"],
            "final_top1": rows[-1]["val_top1"], "train_params": rows[-1]["params"],
            "train_time_s": sum(r["epoch_time_s"] for r in rows),
            "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
            "deployed_params": meta["plain_params"]}


def test_table_numbers_equal_what_the_runs_recorded(runs, tmp_path):
    result = compare_runs([runs["plain"], runs["dyrep"]], tmp_path / "out")
    plain, dyrep = result["rows"]
    assert (plain.run, plain.mode, dyrep.run, dyrep.mode) == ("plain", "plain", "dyrep", "DyRep")
    for row, run_dir in ((plain, runs["plain"]), (dyrep, runs["dyrep"])):
        expected = _expected(run_dir)
        actual = {k: getattr(row, k) for k in expected}
        assert actual == pytest.approx(expected), run_dir.name
        assert row.train_macs is None  # neither the metrics rows nor a deployed.json hold it yet
    # DyRep grew blocks: more parameters while training than deployed; the plain run trains what it deploys
    assert dyrep.train_params > dyrep.deployed_params == plain.deployed_params == plain.train_params
    assert [p.name for p in result["files"]] == [COMPARE_MD, COMPARE_CSV, COMPARE_PNG]
    assert result["curves"] == 2 and (tmp_path / "out" / COMPARE_PNG).stat().st_size > 0

    table = result["markdown"].splitlines()
    assert table[0].startswith("| run | mode |") and len(table) == 4
    assert f"{_expected(runs['dyrep'])['best_top1']:.2f}" in table[3] and f"{dyrep.train_params:,}" in table[3]
    assert result["markdown"] in (tmp_path / "out" / COMPARE_MD).read_text()

    parsed = list(csv.DictReader(io.StringIO((tmp_path / "out" / COMPARE_CSV).read_text())))
    assert [r["mode"] for r in parsed] == ["plain", "DyRep"]
    assert float(parsed[1]["best_top1"]) == pytest.approx(dyrep.best_top1)
    assert int(parsed[1]["train_params"]) == dyrep.train_params and parsed[1]["train_macs"] == ""


def test_deployed_json_supplies_macs_and_deployed_params(runs, tmp_path):
    run_dir = tmp_path / "converted"
    shutil.copytree(runs["dyrep"], run_dir)
    from dyrep_ray.export.convert import convert_checkpoint

    convert_checkpoint(run_dir, evaluate=False)
    sidecar = json.loads((run_dir / DEPLOYED_SIDECAR).read_text())
    row = compare_runs([run_dir], tmp_path / "out")["rows"][0]
    assert row.train_macs == sidecar["macs"]["trained"] > sidecar["macs"]["deployed"]
    assert row.deployed_params == sidecar["params"]["deployed"]
    assert "flops" not in sidecar and "MMACs" in compare_markdown([row])

    # A deployed.json written before the count was called MACs holds it under "flops": still read.
    legacy = {("flops" if key == "macs" else key): value for key, value in sidecar.items() if key != "macs_unit"}
    (run_dir / DEPLOYED_SIDECAR).write_text(json.dumps(legacy))
    assert compare_runs([run_dir], tmp_path / "legacy")["rows"][0].train_macs == sidecar["macs"]["trained"]


def test_metrics_row_macs_win_over_deployed_json_under_either_name(runs, tmp_path):
    run_dir = tmp_path / "recorded"
    shutil.copytree(runs["plain"], run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    (run_dir / DEPLOYED_SIDECAR).write_text(json.dumps({"macs": {"trained": 1}, "params": {"deployed": 2}}))
    for key, value in (("macs", 14_600_000), ("flops", 7_300_000)):  # "flops": older run directories' name
        rows[-1] = {k: v for k, v in rows[-1].items() if k not in ("macs", "flops")} | {key: value}
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert compare_runs([run_dir], tmp_path / key)["rows"][0].train_macs == value


def test_mode_column_reads_the_dbb_key(runs, tmp_path):
    run_dir = tmp_path / "static_dbb"
    shutil.copytree(runs["plain"], run_dir)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    (run_dir / CONFIG_FILE).write_text(json.dumps({**config, "dyrep": False, "dbb": True}))
    assert compare_runs([run_dir], tmp_path / "out")["rows"][0].mode == "DBB"


def test_cli_prints_the_markdown_table(runs, tmp_path, capsys):
    assert main(["compare", str(runs["plain"]), str(runs["dyrep"]), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | mode |") and "| plain | plain |" in out and "| dyrep | DyRep |" in out
    assert (tmp_path / "o" / COMPARE_CSV).is_file()


@pytest.mark.parametrize("problem", ["missing", "no_metrics", "garbage_metrics"])
def test_bad_run_dir_is_one_line_and_exit_2_with_nothing_written(runs, tmp_path, capsys, problem):
    bad = tmp_path / "bad"
    if problem != "missing":
        bad.mkdir()
    if problem == "garbage_metrics":
        (bad / METRICS_FILE).write_text("{not json\n")
    out = tmp_path / "out"
    assert main(["compare", str(runs["plain"]), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("dyrep-ray: error:")
    assert not out.exists()


def test_module_entry_imports_neither_torch_nor_ray(runs, tmp_path):
    code = ("import sys; from dyrep_ray.report.compare import compare_main; "
            f"rc = compare_main([{str(runs['plain'])!r}, {str(runs['dyrep'])!r}, '--out', {str(tmp_path)!r}]); "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "assert not bad, bad; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| plain | plain |" in done.stdout and (tmp_path / COMPARE_MD).is_file()
    missing = subprocess.run([sys.executable, "-m", "dyrep_ray.report.compare", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
