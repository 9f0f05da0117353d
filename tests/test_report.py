"""``dyrep-ray report``: figures and summary.md that show what DyRep did to a run (or a sweep)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dyrep_ray.cli import main
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.context import LocalContext
from dyrep_ray.engine.loop import train
from dyrep_ray.report import adjust_epochs, find_runs, load_run, render_run_report, timeline, timeline_rows
from tests.helpers import LOCAL_TINY, run_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("report") / "run"
        cfg = load_config(None, LOCAL_TINY)
        train(cfg, LocalContext(torch.device("cpu"), run_dir, cfg.keep_checkpoints))
    finally:
        torch.set_num_threads(threads)
    return run_dir




def _check_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000, path
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and float(pixels.std()) > 0.01  # not blank


# ---------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------
def test_report_cli_writes_pngs_and_summary(tiny_run, capsys, monkeypatch):
    # the report reads JSON only: any attempt to load tensors fails the test
    def no_tensors(*args, **kwargs):
        raise AssertionError("report must not load tensor files")

    monkeypatch.setattr(torch, "load", no_tensors)
    assert main(["report", str(tiny_run)]) == 0
    out = tiny_run / "report"
    for name in ("structure_timeline.png", "curves.png", "params.png"):
        _check_png(out / name)
    metrics = run_metrics(tiny_run)
    best = max(m["val_top1"] for m in metrics)
    summary = (out / "summary.md").read_text()
    assert f"{best:.2f}%" in summary
    grows = sum(e["op"] == "grow" for m in metrics for e in m["events"])
    assert f"| grows / cuts | {grows} / 0 |" in summary
    for name in ("structure_timeline.png", "curves.png", "params.png"):
        assert f"]({name})" in summary  # linked relative to the report folder
    assert "report:" in capsys.readouterr().out


def test_figures_reflect_the_run(tiny_run, tmp_path):
    metrics = run_metrics(tiny_run)
    grow_events = [(e["path"], m["epoch"]) for m in metrics for e in m["events"] if e["op"] == "grow"]
    assert len(grow_events) == 4  # top-2 grows after epochs 1 and 2
    result = render_run_report(load_run(tiny_run), tmp_path)
    assert result["timeline"]["grow_markers"] == len(grow_events)
    assert result["timeline"]["cut_markers"] == 0
    rows = timeline_rows(metrics)
    assert set(rows) == {p for p, _ in grow_events}
    assert result["timeline"]["rows"] == len(rows) and result["timeline"]["epochs"] == 3
    for path, epoch in grow_events:  # a row is a plain conv before its grow, a block from then on
        assert all(state is None for state in rows[path][:epoch - 1])
        assert all(state for state in rows[path][epoch - 1:])
    # grown blocks at the end == structure.json's blocks
    structure = json.loads((tiny_run / "structure.json").read_text())
    assert {p for p, states in rows.items() if states[-1]} == {b["path"] for b in structure["blocks"]}
    # adjust points after epochs 1 and 2 (interval 1, none after the last epoch), params vs plain line
    assert result["curves"]["adjust_lines"] == 2 and {"val_top1", "train_loss", "val_loss"} <= set(
        result["curves"]["series"])
    assert result["params"]["points"] == 3 and result["params"]["plain_line"]
    summary = result["summary"]
    assert summary["plain_params"] < summary["max_train_params"] == max(m["params"] for m in metrics)


def test_sweep_dir_gets_per_trial_reports_and_a_comparison(tiny_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for i, lr in enumerate((0.05, 0.1)):
        trial = sweep / f"trial_{i}"
        shutil.copytree(tiny_run, trial, ignore=shutil.ignore_patterns("report", "checkpoint_*"))
        config = json.loads((trial / "config.json").read_text())
        config["lr"] = lr
        (trial / "config.json").write_text(json.dumps(config))
        if i == 1:  # trial_1 was continued by a PBT exploit: its newest segment (seg1) tells its story
            segment = trial / "seg1"
            shutil.copytree(trial, segment)
            lines = [json.loads(x) for x in (segment / "metrics.jsonl").read_text().splitlines()]
            for m in lines:
                m["val_top1"] = m["val_top1"] / 2
            (segment / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert find_runs(sweep) == [sweep / "trial_0", sweep / "trial_1" / "seg1"]
    assert main(["report", str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    _check_png(out / "comparison_val_top1.png")
    for trial in ("trial_0", "trial_1"):
        for name in ("structure_timeline.png", "curves.png", "params.png"):
            _check_png(out / trial / name)
        assert (out / trial / "summary.md").is_file()
    table = (out / "summary.md").read_text()
    assert "[trial_0](trial_0/summary.md)" in table and "[trial_1](trial_1/summary.md)" in table
    assert "| max train params | lr |" in table  # the config key the sweep varied is a column
    assert table.index("trial_0") < table.index("trial_1")  # sorted by best top-1
    best_1 = max(m["val_top1"] for m in run_metrics(tiny_run)) / 2
    assert f"| [trial_1](trial_1/summary.md) | {best_1:.2f}% |" in table  # read from the segment
    assert "seg1" in (out / "trial_1" / "summary.md").read_text()
    assert "2 trials" in capsys.readouterr().out


def test_report_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]


# ---------------------------------------------------------------------------
# Pure data functions
# ---------------------------------------------------------------------------
def _record(epoch, events=(), **extra):
    return {"epoch": epoch, "val_top1": 10.0 * epoch, "train_loss": 1.0, "val_loss": 1.0, "params": 100,
            "events": list(events), **extra}


ALL = ["1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1"]


def test_timeline_replays_grows_cuts_and_collapses():
    metrics = [
        _record(1, [{"op": "grow", "path": "a", "branches": ALL}]),
        _record(2, [{"op": "grow", "path": "a.branches.kxk.conv", "branches": ["1x1", "kxk"]},
                    {"op": "grow", "path": "b", "branches": ["kxk", "1x1"]}]),
        _record(3, [{"op": "cut", "path": "a", "branches": ["1x1", "1xk"], "collapsed": False,
                     "remaining": ["1x1_kxk", "1x1_avg", "kxk", "kx1"]}]),
        _record(4),
        _record(5, [{"op": "cut", "path": "a", "branches": ["1x1_kxk", "1x1_avg", "kx1"], "collapsed": True,
                     "remaining": []},
                    {"op": "grow", "path": "c", "branches": ALL}]),
        _record(6, [{"op": "grow", "path": "a", "branches": ALL}]),  # a collapsed block may grow again
    ]
    tl = timeline(metrics)
    assert tl.epochs == [1, 2, 3, 4, 5, 6]
    assert list(tl.rows) == ["a", "a.branches.kxk.conv", "b", "c"]
    a = tl.rows["a"]
    assert a[0] == a[1] == tuple(ALL)
    assert a[2] == a[3] == ("1x1_kxk", "1x1_avg", "kxk", "kx1")
    assert a[4] is None and a[5] == tuple(ALL)
    # the nested block disappears with its collapsed parent
    assert tl.rows["a.branches.kxk.conv"] == [None, ("1x1", "kxk"), ("1x1", "kxk"), ("1x1", "kxk"), None, None]
    assert tl.rows["c"] == [None] * 4 + [tuple(ALL)] * 2
    assert tl.grows == [("a", 1), ("a.branches.kxk.conv", 2), ("b", 2), ("c", 5), ("a", 6)]
    assert [(p, e, collapsed) for p, e, _, collapsed in tl.cuts] == [("a", 3, False), ("a", 5, True)]
    assert timeline_rows(metrics) == tl.rows


def test_timeline_figure_draws_one_marker_per_event(tmp_path):
    from dyrep_ray.report.figures import draw_timeline, new_figure, save_figure

    metrics = [
        _record(1, [{"op": "grow", "path": "x", "branches": ALL}, {"op": "grow", "path": "y", "branches": ALL}]),
        _record(2, [{"op": "cut", "path": "x", "branches": ["1x1"], "collapsed": False,
                     "remaining": ALL[1:]}]),
        _record(3, [{"op": "cut", "path": "x", "branches": ALL[1:3] + ALL[4:], "collapsed": True}]),
    ]
    fig = new_figure(6, 3)
    drawn = draw_timeline(fig.add_subplot(1, 1, 1), timeline(metrics))
    assert (drawn["grow_markers"], drawn["cut_markers"], drawn["rows"]) == (2, 2, 2)
    save_figure(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC


def test_adjust_epochs_follow_the_loop_schedule():
    metrics = [_record(e, [{"op": "grow", "path": "x", "branches": ALL}] if e == 6 else []) for e in range(1, 11)]
    config = {"dyrep": True, "dyrep_adjust_interval": 3, "dyrep_max_adjust_epochs": 7, "epochs": 10}
    assert adjust_epochs(metrics, config) == [3, 6]
    assert adjust_epochs(metrics, None) == [6]  # without a config: epochs that recorded events
    assert adjust_epochs(metrics, {**config, "dyrep": False}) == [6]


def test_load_run_tolerates_a_truncated_metrics_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n{\"epoch\": 3, ")
    (run / "config.json").write_text(json.dumps({"model": "small_cnn", "dataset": "synthetic"}))
    data = load_run(run)
    assert [m["epoch"] for m in data.metrics] == [1, 2] and data.skipped_lines == 1
    # No checkpoint and every epoch had blocks (records without n_blocks=0): the plain count is unknown; report
    # builds no model to guess it (a config can name any model).
    assert data.plain_params is None and data.plain_params_source is None


def test_report_copies_of_rep_tables_match_the_registry():
    """report stays torch-free, so it keeps its own copies of two rep tables; they must not drift."""
    from dyrep_ray.rep import BRANCH_NAMES
    from dyrep_ray.rep.blocks import GRAPH_ENTRY_TYPES
    from dyrep_ray.report.figures import MAX_BRANCHES
    from dyrep_ray.report.history import GRAPH_BLOCK_TYPES

    assert set(GRAPH_BLOCK_TYPES) == set(GRAPH_ENTRY_TYPES.values())  # report's torch-free copy
    assert len(GRAPH_BLOCK_TYPES) == len(set(GRAPH_BLOCK_TYPES))
    assert MAX_BRANCHES == len(BRANCH_NAMES)


def test_run_summary_lists_blocks_of_both_types():
    from dyrep_ray.report.history import GRAPH_BLOCK_TYPES, run_summary
    from dyrep_ray.report.runs import RunData

    metrics = [_record(1, [{"op": "grow", "path": "a", "branches": ALL}])]
    for entry_type in GRAPH_BLOCK_TYPES:
        structure = {"blocks": [{"path": "a", "type": entry_type, "branches": ALL},
                                {"path": "b", "type": "somebody_else", "branches": ["kxk"]}]}
        summary = run_summary(RunData(run_dir=None, name="r", metrics=metrics, structure=structure))
        assert summary["final_blocks"] == {"a": ALL} and summary["unexplained_blocks"] == [], entry_type
