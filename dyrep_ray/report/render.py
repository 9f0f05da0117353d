"""Whole reports: a run's three PNGs and ``summary.md``, a sweep's per-trial reports with a comparison plot and
table, and :func:`render_report`, which tells the two apart (``dyrep-ray report RUN_DIR``)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ..rundir.layout import METRICS_FILE, REPORT_DIR, SEGMENT_PREFIX
from .figures import (
    MAX_BRANCHES,
    draw_comparison,
    draw_curves,
    draw_params,
    draw_timeline,
    new_figure,
    plot_text,
    save_figure,
    timeline_figure_size,
)
from .history import adjust_epochs, run_summary, timeline
from .markdown import (
    COMPARISON_PNG,
    CURVES_PNG,
    PARAMS_PNG,
    SUMMARY_MD,
    TIMELINE_PNG,
    summary_markdown,
    sweep_markdown,
)
from .runs import SWEEP_SEARCH_DEPTH, TRIAL_REPORT_ERRORS, ReportError, RunData, find_runs, load_run

logger = logging.getLogger(__name__)


def render_run_report(run: RunData, out_dir: str | os.PathLike) -> dict:
    """Write the three PNGs and ``summary.md`` for one run into ``out_dir``; returns what was drawn."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tl = timeline(run.metrics)
    adjust = adjust_epochs(run.metrics, run.config)
    model = plot_text((run.config or {}).get("model", "?"))
    title_name = plot_text(run.name)

    fig = new_figure(*timeline_figure_size(tl))
    ax = fig.add_subplot(1, 1, 1)
    drawn_timeline = draw_timeline(ax, tl, f"{title_name} ({model}): structure timeline, {len(tl.grows)} grows, "
                                           f"{len(tl.cuts)} cuts")
    if drawn_timeline["image"] is not None:
        bar = fig.colorbar(drawn_timeline["image"], ax=ax, location="top", shrink=0.45, pad=0.02, aspect=30,
                           ticks=range(MAX_BRANCHES + 1))
        bar.set_label("branches in the block (0 = plain conv)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    save_figure(fig, out_dir / TIMELINE_PNG)

    fig = new_figure(11.0, 4.0)
    drawn_curves = draw_curves(fig.subplots(1, 2), run.metrics, adjust, f"{title_name} ({model})")
    save_figure(fig, out_dir / CURVES_PNG)

    fig = new_figure(7.0, 4.0)
    drawn_params = draw_params(fig.add_subplot(1, 1, 1), run.metrics, run.plain_params, adjust,
                               f"{title_name}: parameters during training vs deployed")
    save_figure(fig, out_dir / PARAMS_PNG)

    summary = run_summary(run)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(run, summary, tl))
    drawn_timeline.pop("image")
    return {"out_dir": out_dir, "summary": summary, "timeline": drawn_timeline, "curves": drawn_curves,
            "params": drawn_params, "files": [out_dir / n for n in (TIMELINE_PNG, CURVES_PNG, PARAMS_PNG, SUMMARY_MD)]}


def _trial_folder(root: Path, run_dir: Path) -> str:
    if re.fullmatch(rf"{SEGMENT_PREFIX}\d+", run_dir.name) and (run_dir.parent / METRICS_FILE).is_file():
        run_dir = run_dir.parent  # a PBT segment reports under its trial's name
    return "__".join(run_dir.relative_to(root).parts) or run_dir.name


def _config_differences(runs: list[RunData]) -> list[str]:
    """Config keys whose values differ between trials (what the sweep varied)."""
    configs = [r.config or {} for r in runs]
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
            and k not in ("storage_path", "data_dir")]


def render_sweep_report(root: str | os.PathLike, run_dirs: list[Path], out_dir: str | os.PathLike) -> dict:
    """Per-trial reports in sub-folders, a val_top1 comparison plot and a summary table."""
    root, out_dir = Path(root), Path(out_dir)
    runs, trials, failed = [], {}, {}
    for run_dir in run_dirs:  # one unreadable trial is marked in the table; the others are still reported
        name = _trial_folder(root, run_dir)
        try:
            run = load_run(run_dir, name=name)
            trials[name] = render_run_report(run, out_dir / name)
        except TRIAL_REPORT_ERRORS as exc:
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            logger.warning("sweep report: trial %s left out (%s)", name, failed[name])
            continue
        runs.append(run)
    if not runs:
        raise ReportError(f"{root}: no trial could be reported ({'; '.join(f'{k}: {v}' for k, v in failed.items())})"
                          .splitlines()[0][:400])
    fig = new_figure(11.0, 5.0)
    drawn = draw_comparison(fig.add_subplot(1, 1, 1), runs)
    save_figure(fig, out_dir / COMPARISON_PNG)
    varied = _config_differences(runs)
    summaries = {name: trial["summary"] for name, trial in trials.items()}
    (out_dir / SUMMARY_MD).write_text(sweep_markdown(root, runs, summaries, varied, failed))
    return {"out_dir": out_dir, "trials": trials, "failed": failed, "comparison": drawn, "varied": varied,
            "files": [out_dir / COMPARISON_PNG, out_dir / SUMMARY_MD]}


def render_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Report for a run directory, or for every trial of a sweep directory (plus a comparison)."""
    from ..rundir.lock import refuse_symlinks

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    refuse_symlinks(run_dir)  # report/ (and what is read) never through a link out of the directory
    out_dir = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    found = find_runs(run_dir)
    if not found:
        raise ReportError(f"{run_dir}: no {METRICS_FILE} in it or in its sub-directories (depth "
                          f"{SWEEP_SEARCH_DEPTH}); is this a dyrep-ray run or sweep directory?")
    if (run_dir / METRICS_FILE).is_file():
        result = render_run_report(load_run(found[0], name=run_dir.name), out_dir)
        result["mode"] = "run"
        return result
    result = render_sweep_report(run_dir, found, out_dir)
    result["mode"] = "sweep"
    return result
