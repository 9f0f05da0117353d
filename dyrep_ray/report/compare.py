"""The paper's comparison table for several runs: ``dyrep-ray compare RUN_DIR... [--out DIR]``.

One row per run: mode (plain / DBB / DyRep, from ``config.json``; a static DBB baseline built by dyrep-ray's first
rule, not the original's converter, says "DBB (every conv)"), best and final val top-1, the parameters and
multiply-accumulates (MACs) of the trained network at the end, training time, throughput and the deployed model's
parameters.
Printed as Markdown; ``compare.md``, ``compare.csv`` and one PNG of the val top-1 curves (one panel per run,
side by side, shared y axis) are written to ``--out``.

Reads JSON files only, with :mod:`.runs`' readers, and imports neither torch nor Ray (``python -m
dyrep_ray.report.compare`` runs without either; the ``dyrep-ray`` CLI itself loads torch for other commands).
Where a number is not in the run directory the cell says ``n/a``:

* training MACs at the end come from the last ``metrics.jsonl`` row's ``macs`` when the loop records it,
  else from ``deployed.json`` (``macs.trained``, written by ``dyrep-ray convert``); both are also read under
  the name ``flops`` that older run directories used for the same count;
* deployed parameters come from ``deployed.json`` (``params.deployed``), else from the checkpoint meta's
  ``plain_params``: folding every block gives back the plain architecture, so the two counts are equal.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rundir.layout import (
    CONFIG_FILE,
    DEPLOYED_SIDECAR,
    LEGACY_MACS_KEY,
    MACS_KEY,
    METRICS_FILE,
    STRUCTURE_FILE,
)
from .arguments import add_compare_arguments
from .figures import new_figure, save_figure
from .runs import ReportError, RunData, _plain_params_from_checkpoints, _read_json, read_metrics

logger = logging.getLogger(__name__)

COMPARE_MD = "compare.md"
COMPARE_CSV = "compare.csv"
COMPARE_PNG = "compare_val_top1.png"
DEFAULT_OUT = "compare"
PANEL_WIDTH_IN = 3.6
PANEL_HEIGHT_IN = 3.2
MEGA = 1e6
EXIT_USER_ERROR = 2  # as dyrep_ray.cli.EXIT_USAGE

MODE_PLAIN, MODE_DBB, MODE_DYREP = "plain", "DBB", "DyRep"
#: The static DBB baseline of dyrep-ray's first version (``dbb_convert: every_conv``; a run directory whose config
#: predates the key built that one): not the paper's DBB, so its rows say so.
MODE_DBB_EVERY_CONV = "DBB (every conv)"


# ---------------------------------------------------------------------------
# Reading (JSON only)
# ---------------------------------------------------------------------------
def read_run(run_dir: str | os.PathLike, name: str | None = None) -> RunData:
    """A run directory's JSON files as :class:`RunData`; never builds a model.  Unlike ``runs.load_run``, the plain
    parameter count comes from checkpoint meta only, and a run without a readable epoch record is an error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; pass dyrep-ray run directories (each with {METRICS_FILE})")
    if not (run_dir / METRICS_FILE).is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (not a dyrep-ray run directory); pass run directories")
    try:
        metrics, skipped = read_metrics(run_dir / METRICS_FILE)
    except OSError as exc:
        raise ReportError(f"{run_dir / METRICS_FILE}: cannot be read ({exc.strerror or exc})") from None
    if not metrics:
        raise ReportError(f"{run_dir / METRICS_FILE}: no readable epoch record; has the run finished an epoch?")
    run = RunData(run_dir, name or run_dir.name, metrics, skipped_lines=skipped)
    for attr, file_name in (("structure", STRUCTURE_FILE), ("config", CONFIG_FILE), ("deployed", DEPLOYED_SIDECAR)):
        if (run_dir / file_name).is_file():
            value = _read_json(run_dir / file_name)
            setattr(run, attr, value if isinstance(value, dict) else None)
    run.plain_params = _plain_params_from_checkpoints(run_dir)
    run.plain_params_source = "checkpoint meta" if run.plain_params is not None else None
    return run


def run_mode(config: dict | None) -> str:
    """plain / DBB / DyRep from a run's config (``dbb: true`` = the static DBB baseline: "DBB" as the original's
    ``--dbb`` builds it, "DBB (every conv)" for ``dbb_convert: every_conv`` or a config without that key)."""
    config = config or {}
    if config.get("dbb"):
        return MODE_DBB if config.get("dbb_convert", "every_conv") == "original" else MODE_DBB_EVERY_CONV
    return MODE_DYREP if config.get("dyrep", True) else MODE_PLAIN


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _first_number(*values: Any) -> float | None:
    return next((n for v in values if (n := _number(v)) is not None), None)


def _nested(data: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


@dataclass(frozen=True)
class CompareRow:
    """One run's numbers (None = not recorded in the run directory)."""

    run: str
    mode: str
    model: str | None
    dataset: str | None
    epochs: int
    best_top1: float | None
    best_epoch: int | None
    final_top1: float | None
    train_params: int | None  # of the trained network (blocks included) after the last epoch
    train_macs: int | None  # MACs per image of the trained network at the end
    train_time_s: float | None  # sum of epoch_time_s: training, adjusts and evaluation
    images_per_s: float | None  # mean over epochs of the training throughput
    deployed_params: int | None


def compare_row(run: RunData) -> CompareRow:
    m = run.metrics
    tops = [(v, int(r["epoch"])) for r in m if (v := _number(r.get("val_top1"))) is not None]
    best = max(tops, key=lambda t: t[0], default=(None, None))
    last = m[-1]
    times = [t for r in m if (t := _number(r.get("epoch_time_s"))) is not None]
    speeds = [s for r in m if (s := _number(r.get("images_per_s"))) is not None]
    macs = _first_number(last.get(MACS_KEY), last.get(LEGACY_MACS_KEY),
                         _nested(run.deployed, MACS_KEY, "trained"), _nested(run.deployed, LEGACY_MACS_KEY, "trained"))
    deployed = _number(_nested(run.deployed, "params", "deployed"))
    if deployed is None:
        deployed = run.plain_params
    params = _number(last.get("params"))
    return CompareRow(
        run=run.name, mode=run_mode(run.config), model=(run.config or {}).get("model"),
        dataset=(run.config or {}).get("dataset"), epochs=len(m), best_top1=best[0], best_epoch=best[1],
        final_top1=_number(last.get("val_top1")), train_params=None if params is None else int(params),
        train_macs=None if macs is None else int(macs), train_time_s=sum(times) if times else None,
        images_per_s=sum(speeds) / len(speeds) if speeds else None,
        deployed_params=None if deployed is None else int(deployed),
    )


# ---------------------------------------------------------------------------
# Tables (also used by experiments/study)
# ---------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` when it is missing or not finite."""
    number = _number(value)
    return "n/a" if number is None else f"{number:{spec}}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (``|`` inside cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in r] for r in rows)
    return buffer.getvalue()


# (header, CSV field of CompareRow, Markdown formatter)
COLUMNS: tuple[tuple[str, str, Callable[[CompareRow], str]], ...] = (
    ("run", "run", lambda r: r.run),
    ("mode", "mode", lambda r: r.mode),
    ("model", "model", lambda r: r.model or "n/a"),
    ("epochs", "epochs", lambda r: str(r.epochs)),
    ("best top-1 (%)", "best_top1", lambda r: fmt(r.best_top1, ".2f")
     + (f" (ep {r.best_epoch})" if r.best_epoch is not None else "")),
    ("final top-1 (%)", "final_top1", lambda r: fmt(r.final_top1, ".2f")),
    ("train params (end)", "train_params", lambda r: fmt(r.train_params, ",")),
    ("train MMACs (end)", "train_macs", lambda r: fmt(None if r.train_macs is None else r.train_macs / MEGA, ".1f")),
    ("train time (s)", "train_time_s", lambda r: fmt(r.train_time_s, ".1f")),
    ("images/s", "images_per_s", lambda r: fmt(r.images_per_s, ".1f")),
    ("deployed params", "deployed_params", lambda r: fmt(r.deployed_params, ",")),
)


def compare_markdown(rows: Sequence[CompareRow]) -> str:
    return markdown_table([c[0] for c in COLUMNS], [[c[2](r) for c in COLUMNS] for r in rows])


def compare_csv(rows: Sequence[CompareRow]) -> str:
    return csv_text([c[1] for c in COLUMNS] + ["best_epoch"],
                    [[getattr(r, c[1]) for c in COLUMNS] + [r.best_epoch] for r in rows])


# ---------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------
def draw_top1_panels(runs: Sequence[RunData], rows: Sequence[CompareRow]) -> tuple[Any, int]:
    """One panel per run (val top-1 vs epoch), side by side with a shared y axis; returns (figure, lines)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(PANEL_WIDTH_IN * len(runs), PANEL_HEIGHT_IN)
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    drawn = 0
    for ax, run, row in zip(axes, runs, rows):
        pts = [(int(r["epoch"]), v) for r in run.metrics if (v := _number(r.get("val_top1"))) is not None]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=2.5, linewidth=1.3)
            drawn += 1
        ax.set_title(f"{row.run}\n{row.mode}, best {fmt(row.best_top1, '.2f')}%", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    return fig, drawn


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------
def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]  # two runs of the same name in different folders: show the paths


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> dict:
    """Read every run (all before writing anything), write compare.md / compare.csv / the PNG into ``out_dir``."""
    if not run_dirs:
        raise ReportError("no run directory given; pass one or more dyrep-ray run directories")
    paths = [Path(d) for d in run_dirs]
    runs = [read_run(d, name) for d, name in zip(paths, _unique_names(paths))]
    rows = [compare_row(r) for r in runs]
    out = Path(out_dir if out_dir is not None else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    markdown = compare_markdown(rows)
    (out / COMPARE_MD).write_text(f"# dyrep-ray compare\n\n{markdown}\n![val top-1 per run]({COMPARE_PNG})\n")
    (out / COMPARE_CSV).write_text(compare_csv(rows))
    fig, lines = draw_top1_panels(runs, rows)
    save_figure(fig, out / COMPARE_PNG)
    return {"rows": rows, "markdown": markdown, "out_dir": out, "curves": lines,
            "files": [out / COMPARE_MD, out / COMPARE_CSV, out / COMPARE_PNG]}


# ---------------------------------------------------------------------------
# The command: ``dyrep-ray compare`` and ``python -m dyrep_ray.report.compare``
# ---------------------------------------------------------------------------
def print_comparison(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> int:
    """What the compare command prints (the Markdown table, then the files written); 0."""
    result = compare_runs(run_dirs, out_dir)
    print(result["markdown"], end="")
    print(f"\ndyrep-ray: compare: {len(result['rows'])} run(s); wrote {', '.join(str(f) for f in result['files'])}")
    return 0


def compare_main(argv=None) -> int:
    """``python -m dyrep_ray.report.compare``: the compare command without the CLI (which loads torch)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dyrep_ray.report.compare",
                                     description="the paper-style comparison table of dyrep-ray runs")
    add_compare_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return print_comparison(args.run_dirs, args.out)
    except UserError as exc:
        print(f"dyrep-ray: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # python -m dyrep_ray.report.compare RUN_DIR... (no torch, no Ray)
    sys.exit(compare_main())
