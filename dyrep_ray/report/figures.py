"""What DyRep did to a network, as data (pure functions) and as PNG figures (matplotlib, Agg).

Only JSON is read: ``metrics.jsonl``, ``structure.json``, ``config.json``, the ``meta.json`` of
checkpoints and ``deployed.json`` (written by ``dyrep-ray convert``) when present.  No tensor file is
ever opened.

Data functions (tested directly): :func:`load_run`, :func:`timeline`, :func:`timeline_rows`,
:func:`adjust_epochs`, :func:`run_summary`.  Drawing functions take a matplotlib ``Axes``/``Figure``
and return counts of what they drew (e.g. ``grow_markers``), so tests can check the pictures show
the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from matplotlib.ticker import MaxNLocator

from ..errors import UserError
from ..rundir.files import parse_metrics, plain_params_from
from ..rundir.layout import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    DEPLOYED_SIDECAR,
    METRICS_FILE,
    REPORT_DIR,
    SEGMENT_PREFIX,
    STRUCTURE_FILE,
)
from ..rundir.storage import RunStorage

logger = logging.getLogger(__name__)

MAX_BRANCHES = 7  # len(dyrep_ray.rep.BRANCH_NAMES)
SWEEP_SEARCH_DEPTH = 4
CELL_TEXT_MAX = 40  # write branch counts in cells while rows and epochs stay below this
DPI = 110
PLOT_TEXT_MAX = 80  # characters of a run name / model / conv path drawn into a figure
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ReportError(UserError, ValueError):
    """Nothing to report on (no metrics.jsonl) or an unreadable run."""


#: What one trial's hostile or broken files can raise while it is read and drawn (values of the wrong type in
#: JSON reach arithmetic and formatting); such a trial is marked in a sweep report, the others are reported.
TRIAL_REPORT_ERRORS = (UserError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                       OverflowError, RecursionError)


# ---------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------
@dataclass
class RunData:
    run_dir: Path
    name: str
    metrics: list[dict]
    structure: dict | None = None
    config: dict | None = None
    plain_params: int | None = None
    plain_params_source: str | None = None
    deployed: dict | None = None  # deployed.json written by `dyrep-ray convert`
    skipped_lines: int = 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s (%s); leaving it out", path, exc)
        return None


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Epoch records of ``metrics.jsonl`` in epoch order; unreadable lines are skipped and counted."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # binary junk, permissions: one line, not a traceback
        raise ReportError(f"{path}: cannot be read as text ({exc})".splitlines()[0][:300]) from None
    records, skipped = parse_metrics(text, strict=False, source=str(path))
    return [r for r in records if isinstance(r, dict)], skipped


def _plain_params_from_checkpoints(run_dir: Path) -> int | None:
    return plain_params_from(RunStorage(str(run_dir.parent), run_dir.name))


def _plain_params_from_metrics(metrics: list[dict]) -> tuple[int, int] | None:
    """(params, epoch) of the first epoch record that holds no DBB block: the training model then *is* the plain
    model.  Nothing is built (a config can name any model; report reads JSON only)."""
    for record in metrics:
        params, blocks = record.get("params"), record.get("n_blocks")
        if type(params) is int and params > 0 and blocks == 0 and type(blocks) is int:
            return params, record.get("epoch")
    return None


def _count(value) -> int | None:
    return value if type(value) is int and value > 0 else None


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> RunData:
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (not a dyrep-ray run directory)")
    metrics, skipped = read_metrics(metrics_path)
    run = RunData(run_dir, name or run_dir.name, metrics, skipped_lines=skipped)
    if (run_dir / STRUCTURE_FILE).is_file():
        structure = _read_json(run_dir / STRUCTURE_FILE)
        run.structure = structure if isinstance(structure, dict) else None
    if (run_dir / CONFIG_FILE).is_file():
        config = _read_json(run_dir / CONFIG_FILE)
        run.config = config if isinstance(config, dict) else None
    if (run_dir / DEPLOYED_SIDECAR).is_file():
        deployed = _read_json(run_dir / DEPLOYED_SIDECAR)
        run.deployed = deployed if isinstance(deployed, dict) else None
    run.plain_params = _plain_params_from_checkpoints(run_dir)
    run.plain_params_source = "checkpoint meta" if run.plain_params is not None else None
    if run.plain_params is None and run.deployed and isinstance(run.deployed.get("params"), dict):
        run.plain_params = _count(run.deployed["params"].get("plain"))
        run.plain_params_source = DEPLOYED_SIDECAR if run.plain_params is not None else None
    if run.plain_params is None:  # no checkpoint (yet): only an epoch without blocks tells; else it is unknown
        found = _plain_params_from_metrics(run.metrics)
        if found is not None:
            run.plain_params, epoch = found
            run.plain_params_source = f"{METRICS_FILE}, epoch {epoch} (no DBB block yet)"
    return run


def latest_segment(run_dir: Path) -> Path:
    """A Tune trial continued by PBT exploits keeps later runs in ``seg<N>/`` sub-directories, each
    starting from the donor's history: the newest one holds the trial's whole story."""
    segments = [(int(m.group(1)), d) for d in run_dir.glob(f"{SEGMENT_PREFIX}*")
                if (m := re.fullmatch(rf"{SEGMENT_PREFIX}(\d+)", d.name)) and (d / METRICS_FILE).is_file()]
    return max(segments)[1] if segments else run_dir


def find_runs(root: str | os.PathLike, max_depth: int = SWEEP_SEARCH_DEPTH) -> list[Path]:
    """``[root]`` if it is a run directory, else every run directory below it (a Tune sweep).

    For a trial with PBT segments the run directory of its newest segment is returned.
    """
    root = Path(root)
    if (root / METRICS_FILE).is_file():
        return [latest_segment(root)]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if METRICS_FILE in filenames and Path(dirpath) != root:
            found.append(latest_segment(Path(dirpath)))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", CHECKPOINT_PREFIX))
                             and d != REPORT_DIR and depth < max_depth)
    return sorted(found)


# ---------------------------------------------------------------------------
# Pure data for the figures
# ---------------------------------------------------------------------------
BranchSet = tuple  # tuple[str, ...] of branch names; None in a row = a plain conv (or no longer present)


@dataclass
class Timeline:
    epochs: list[int]
    rows: dict[str, list[BranchSet | None]]  # conv path -> branch set after each epoch, first grown first
    grows: list[tuple[str, int]] = field(default_factory=list)  # (path, epoch)
    cuts: list[tuple[str, int, tuple, bool]] = field(default_factory=list)  # (path, epoch, cut branches, collapsed)


def timeline(metrics: list[dict]) -> Timeline:
    """Replay the ``events`` of every epoch record: which convs were blocks, with which branches, when.

    A cut that collapses a block back into a conv also removes the blocks nested in its kxk branch.
    """
    state: dict[str, BranchSet | None] = {}
    rows: dict[str, list] = {}
    result = Timeline([int(m["epoch"]) for m in metrics], rows)
    for column, record in enumerate(metrics):
        epoch = int(record["epoch"])
        for event in record.get("events") or []:
            path, op = event.get("path"), event.get("op")
            if not isinstance(path, str):
                continue
            rows.setdefault(path, [None] * column)
            if op == "grow":
                state[path] = tuple(event.get("branches") or ())
                result.grows.append((path, epoch))
            elif op == "cut":
                cut = tuple(event.get("branches") or ())
                if event.get("collapsed"):
                    for p in state:
                        if p == path or p.startswith(path + "."):
                            state[p] = None
                elif event.get("remaining"):
                    state[path] = tuple(event["remaining"])
                else:
                    state[path] = tuple(b for b in (state.get(path) or ()) if b not in cut)
                result.cuts.append((path, epoch, cut, bool(event.get("collapsed"))))
        for p in rows:
            rows[p].append(state.get(p))
    return result


def timeline_rows(metrics: list[dict]) -> dict[str, list[BranchSet | None]]:
    """conv path -> branch set held after each epoch (None = plain conv) for every conv ever grown."""
    return timeline(metrics).rows


def adjust_epochs(metrics: list[dict], config: dict | None = None) -> list[int]:
    """Epochs after which DyRep adjusted the structure: the loop's schedule from ``config`` (when known)
    plus every epoch that recorded an event; limited to the epochs in ``metrics``."""
    seen = [int(m["epoch"]) for m in metrics]
    epochs = {int(m["epoch"]) for m in metrics if m.get("events")}
    if isinstance(config, dict) and config.get("dyrep", True):
        try:
            interval = int(config.get("dyrep_adjust_interval", 1))
            max_adjust = int(config.get("dyrep_max_adjust_epochs", 10 ** 9))
            total = int(config.get("epochs", max(seen, default=0) + 1))
            epochs |= {e for e in seen if interval > 0 and e % interval == 0 and e <= max_adjust and e < total}
        except (TypeError, ValueError):
            pass
    return sorted(e for e in epochs if e in set(seen))


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


#: Structure-graph entry types of DyRep blocks (bn block, online block): rep.blocks.GRAPH_ENTRY_TYPES, kept here
#: because report stays torch-free (a test keeps them equal).
GRAPH_BLOCK_TYPES = ("dbb", "online")


def run_summary(run: RunData) -> dict:
    """Numbers for summary.md and the sweep table."""
    m = run.metrics
    tl = timeline(m)
    tops = [(x.get("val_top1"), int(x["epoch"])) for x in m if _finite([x.get("val_top1")])]
    best = max(tops, default=(None, None))
    params = _finite(x.get("params") for x in m)
    final_structure = {}
    if run.structure and isinstance(run.structure.get("blocks"), list):
        final_structure = {b.get("path"): b.get("branches") for b in run.structure["blocks"]
                           if isinstance(b, dict) and b.get("type") in GRAPH_BLOCK_TYPES}
    replayed = {p for p, states in tl.rows.items() if states and states[-1] is not None}
    return {
        "name": run.name, "epochs": len(m),
        "model": (run.config or {}).get("model"), "dataset": (run.config or {}).get("dataset"),
        "best_top1": best[0], "best_epoch": best[1],
        "final_top1": m[-1].get("val_top1") if m else None,
        "grows": len(tl.grows), "cuts": len(tl.cuts),
        "plain_params": run.plain_params,
        "max_train_params": int(max(params)) if params else None,
        "final_train_params": int(params[-1]) if params else None,
        "final_blocks": final_structure,
        "unexplained_blocks": sorted(set(final_structure) - replayed),  # e.g. inherited from a PBT donor
    }


# ---------------------------------------------------------------------------
# Drawing (matplotlib object API, Agg canvas: no pyplot global state, no display)
# ---------------------------------------------------------------------------
def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _branch_colormap():
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap

    ramp = colormaps["viridis"].resampled(MAX_BRANCHES)
    colors = ["#e9e9e9"] + [ramp(MAX_BRANCHES - 1 - i) for i in range(MAX_BRANCHES)]  # 0 = plain conv
    return ListedColormap(colors), BoundaryNorm([i - 0.5 for i in range(MAX_BRANCHES + 2)], MAX_BRANCHES + 1)


def timeline_figure_size(tl: Timeline) -> tuple[float, float]:
    return (min(4.0 + 0.45 * max(len(tl.epochs), 1), 22.0), min(1.8 + 0.42 * max(len(tl.rows), 1), 30.0))


def plot_text(value) -> str:
    """``value`` as literal figure text: ``$`` escaped (matplotlib would parse ``$...$`` as mathtext and fail on
    bad TeX), control characters shown as ``?``, at most :data:`PLOT_TEXT_MAX` characters."""
    text = _CONTROL_CHARS.sub("?", str(value))
    if len(text) > PLOT_TEXT_MAX:
        text = text[:PLOT_TEXT_MAX - 3] + "..."
    return text.replace("$", r"\$")


def draw_timeline(ax, tl: Timeline, title: str = "") -> dict:
    """Rows = convs ever grown, columns = epochs; colour/text = number of branches (grey = plain conv);
    ``^`` = grown at the end of that epoch, ``x`` = branches cut. Returns counts of what was drawn."""
    import numpy as np

    paths = list(tl.rows)
    ax.figure.suptitle(title or "DyRep structure timeline", fontsize=10)
    if not paths or not tl.epochs:
        ax.text(0.5, 0.5, "no conv was grown in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return {"rows": 0, "epochs": len(tl.epochs), "grow_markers": 0, "cut_markers": 0, "image": None}
    col = {e: i for i, e in enumerate(tl.epochs)}
    counts = np.array([[len(s) if s else 0 for s in tl.rows[p]] for p in paths], dtype=float)
    cmap, norm = _branch_colormap()
    x_edges = np.arange(len(tl.epochs) + 1) - 0.5  # column c = tl.epochs[c]
    image = ax.pcolormesh(x_edges, np.arange(len(paths) + 1) - 0.5, counts, cmap=cmap, norm=norm,
                          edgecolors="white", linewidth=0.8)
    if len(paths) <= CELL_TEXT_MAX and len(tl.epochs) <= CELL_TEXT_MAX:
        for r, p in enumerate(paths):
            for c, s in enumerate(tl.rows[p]):
                if s:
                    ax.text(c, r, str(len(s)), ha="center", va="center", fontsize=7,
                            color="white" if len(s) >= 4 else "black")
    row = {p: i for i, p in enumerate(paths)}
    gx = [col[e] + 0.3 for p, e in tl.grows if e in col]
    gy = [row[p] for p, e in tl.grows if e in col]
    grow_artist = ax.scatter(gx, gy, marker="^", s=46, c="#2ca02c", edgecolors="black", linewidths=0.6,
                             zorder=3, label=f"grown ({len(gx)})")
    cx = [col[e] - 0.3 for p, e, _, _ in tl.cuts if e in col]
    cy = [row[p] for p, e, _, _ in tl.cuts if e in col]
    cut_artist = ax.scatter(cx, cy, marker="X", s=46, c="#d62728", edgecolors="black", linewidths=0.5, zorder=3,
                            label=f"branches cut ({len(cx)})")
    ax.set_yticks(range(len(paths)))
    ax.set_yticklabels([plot_text(p) for p in paths], fontsize=7)
    ax.set_ylim(len(paths) - 0.5, -0.5)
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_xlabel("epoch (state after the epoch's adjust point)")
    step = max(1, math.ceil(len(tl.epochs) / 25))
    ax.set_xticks(range(0, len(tl.epochs), step))
    ax.set_xticklabels([str(e) for e in tl.epochs[::step]], fontsize=8)
    ax.text(x_edges[-1] + 0.15, -0.55, "branches at the end:", va="bottom", fontsize=6.5, color="#333333",
            clip_on=False)
    for r, p in enumerate(paths):  # final branch set, right of the grid
        last = tl.rows[p][-1]
        ax.text(x_edges[-1] + 0.15, r, plot_text(" ".join(map(str, last))) if last else "(plain conv)",
                va="center", fontsize=6.5, color="#333333", clip_on=False)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12 - 0.25 / max(len(paths), 1)), ncol=2, fontsize=7,
              frameon=False)
    return {"rows": len(paths), "epochs": len(tl.epochs), "grow_markers": len(grow_artist.get_offsets()),
            "cut_markers": len(cut_artist.get_offsets()), "image": image}


def draw_curves(axes, metrics: list[dict], adjust: list[int], title: str = "") -> dict:
    """Left: val top-1 (and top-5 / EMA top-1 when logged); right: train and val loss.
    Dashed vertical lines at adjust epochs. Returns counts of lines drawn."""
    ax_acc, ax_loss = axes
    epochs = [int(m["epoch"]) for m in metrics]

    def series(key):
        return [m.get(key) if isinstance(m.get(key), (int, float)) else float("nan") for m in metrics]

    plotted = []
    for ax, keys in ((ax_acc, ("val_top1", "val_top5", "ema_val_top1")), (ax_loss, ("train_loss", "val_loss"))):
        for key in keys:
            values = series(key)
            if _finite(values):
                ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.4,
                        linestyle=":" if key == "val_top5" else "-", label=key)
                plotted.append(key)
        lines = 0
        for e in adjust:
            ax.axvline(e, color="#888888", linestyle="--", linewidth=0.8, alpha=0.8,
                       label="adjust point" if lines == 0 else None)
            lines += 1
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    top1 = series("val_top1")
    if _finite(top1):
        i = max(range(len(top1)), key=lambda k: top1[k] if math.isfinite(top1[k]) else -math.inf)
        ax_acc.annotate(f"best {top1[i]:.2f}%", (epochs[i], top1[i]), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_ylabel("loss")
    ax_acc.set_title("validation accuracy", fontsize=10)
    ax_loss.set_title("loss", fontsize=10)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        ax_acc.figure.suptitle(title, fontsize=11)
    return {"series": plotted, "adjust_lines": len(adjust)}


def draw_params(ax, metrics: list[dict], plain_params: int | None, adjust: list[int], title: str = "") -> dict:
    """Training-time parameter count per epoch against the plain (deployed) model's count."""
    from matplotlib.ticker import FuncFormatter

    pts = [(int(m["epoch"]), m["params"]) for m in metrics if _finite([m.get("params")])]
    if pts:
        ax.plot([e for e, _ in pts], [p for _, p in pts], marker="o", markersize=3, color="#1f77b4",
                label="training (DyRep blocks)")
    if plain_params:
        ax.axhline(plain_params, color="#2ca02c", linewidth=1.6, label=f"plain / deployed: {plain_params:,}")
        if pts:
            peak = max(p for _, p in pts)
            ax.annotate(f"max +{100.0 * (peak - plain_params) / plain_params:.1f}% while training",
                        (pts[[p for _, p in pts].index(peak)][0], peak), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
    for i, e in enumerate(adjust):
        ax.axvline(e, color="#888888", linestyle="--", linewidth=0.8, alpha=0.8,
                   label="adjust point" if i == 0 else None)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("parameters")
    ax.set_title(title or "parameters: training vs deployed", fontsize=10)
    ax.grid(alpha=0.3)
    lo = min([p for _, p in pts] + ([plain_params] if plain_params else []), default=0)
    hi = max([p for _, p in pts] + ([plain_params] if plain_params else []), default=1)
    pad = max((hi - lo) * 0.25, hi * 0.005, 1)
    ax.set_ylim(lo - pad, hi + pad)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return {"points": len(pts), "plain_line": bool(plain_params), "adjust_lines": len(adjust)}


def draw_comparison(ax, runs: list[RunData], metric: str = "val_top1") -> dict:
    """One line per trial: ``metric`` vs epoch (legend sorted by best value)."""
    ranked = sorted(runs, key=lambda r: -max(_finite(m.get(metric) for m in r.metrics), default=-math.inf))
    drawn = 0
    for run in ranked:
        pts = [(int(m["epoch"]), m[metric]) for m in run.metrics if _finite([m.get(metric)])]
        if not pts:
            continue
        best = max(v for _, v in pts)
        ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=2.5, linewidth=1.2,
                label=f"{plot_text(run.name)} (best {best:.2f})")
        drawn += 1
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (%)" if "top" in metric else metric)
    ax.set_title(f"{metric} per trial ({drawn} trials)", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return {"lines": drawn}


# ---------------------------------------------------------------------------
# Whole reports
# ---------------------------------------------------------------------------
TIMELINE_PNG = "structure_timeline.png"
CURVES_PNG = "curves.png"
PARAMS_PNG = "params.png"
COMPARISON_PNG = "comparison_val_top1.png"
SUMMARY_MD = "summary.md"


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}{suffix}"


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


def summary_markdown(run: RunData, s: dict, tl: Timeline) -> str:
    plain = s["plain_params"]
    overhead = (f" (+{100.0 * (s['max_train_params'] - plain) / plain:.1f}% at most)"
                if plain and s["max_train_params"] else "")
    lines = [
        f"# DyRep report: {run.name}",
        "",
        f"Model `{s['model']}` on `{s['dataset']}`, {s['epochs']} epoch(s) recorded in `{METRICS_FILE}`.",
        "",
        "| | |",
        "|---|---|",
        f"| best val top-1 | {_fmt(s['best_top1'], '.2f', '%')} (epoch {s['best_epoch']}) |",
        f"| final val top-1 | {_fmt(s['final_top1'], '.2f', '%')} |",
        f"| grows / cuts | {s['grows']} / {s['cuts']} |",
        f"| params, plain = deployed model | "
        f"{_fmt(plain, ',') if plain else 'unknown (no checkpoint or deployed.json records it)'}"
        f"{f' (from {run.plain_params_source})' if run.plain_params_source else ''} |",
        f"| params during training, max / final | {_fmt(s['max_train_params'], ',')} / "
        f"{_fmt(s['final_train_params'], ',')}{overhead} |",
    ]
    d = run.deployed
    if d:
        if d.get("evaluated"):
            lines.append(f"| converted (`{DEPLOYED_SIDECAR}`) | top-1 {_fmt(d.get('top1_before'), '.2f', '%')} "
                         f"before / {_fmt(d.get('top1_after'), '.2f', '%')} after folding, max output difference "
                         f"{_fmt(d.get('max_output_diff'), '.3g')} |")
        else:
            lines.append(f"| converted (`{DEPLOYED_SIDECAR}`) | max output difference "
                         f"{_fmt(d.get('max_output_diff'), '.3g')} (accuracy not measured) |")
    lines += [
        "",
        "## Figures",
        "",
        f"- [structure timeline]({TIMELINE_PNG}): one row per conv that was ever grown; colour and number = branches "
        "it held after each epoch; green triangle = grown, red X = branches cut",
        f"- [accuracy and loss]({CURVES_PNG}): dashed lines = adjust points",
        f"- [parameters]({PARAMS_PNG}): training-time count against the plain (deployed) model",
        "",
        f"![structure timeline]({TIMELINE_PNG})",
        "",
        f"![accuracy and loss]({CURVES_PNG})",
        "",
        f"![parameters]({PARAMS_PNG})",
        "",
    ]
    events = [(int(m["epoch"]), e) for m in run.metrics for e in (m.get("events") or []) if isinstance(e, dict)]
    if events:
        lines += ["## Structure changes", "", "| epoch | op | conv | branches |", "|---|---|---|---|"]
        for epoch, e in events:
            branches = ", ".join(e.get("branches") or [])
            if e.get("op") == "cut":
                branches = f"cut {branches}" + (" (collapsed to a conv)" if e.get("collapsed") else
                                                f"; kept {', '.join(e.get('remaining') or [])}")
            lines.append(f"| {epoch} | {e.get('op')} | `{e.get('path')}` | {branches} |")
        lines.append("")
    if s["final_blocks"]:
        lines += [f"## Final structure (`{STRUCTURE_FILE}`)", "", "| conv | branches |", "|---|---|"]
        lines += [f"| `{p}` | {', '.join(b or [])} |" for p, b in s["final_blocks"].items()]
        lines.append("")
    if s["unexplained_blocks"]:
        lines += [f"Note: {len(s['unexplained_blocks'])} block(s) in `{STRUCTURE_FILE}` have no grow event in "
                  f"`{METRICS_FILE}` (e.g. inherited from a PBT donor): {', '.join(s['unexplained_blocks'][:5])}", ""]
    if run.run_dir.name != run.name and re.fullmatch(rf"{SEGMENT_PREFIX}\d+", run.run_dir.name):
        lines += [f"Note: PBT trial; this report reads its newest segment `{run.run_dir.name}/`, whose history "
                  "includes the epochs inherited from the donor.", ""]
    if run.skipped_lines:
        lines += [f"Note: {run.skipped_lines} unreadable line(s) of `{METRICS_FILE}` were skipped.", ""]
    return "\n".join(lines)


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
    rows = sorted(((trials[r.name]["summary"], r) for r in runs),
                  key=lambda t: -(t[0]["best_top1"] if isinstance(t[0]["best_top1"], (int, float)) else -math.inf))
    lines = [f"# DyRep sweep report: {root.name}", "", f"{len(runs)} trial(s) found under `{root}`.", "",
             f"![val_top1 per trial]({COMPARISON_PNG})", "",
             "| trial | best top-1 | final top-1 | epochs | grows | cuts | max train params | "
             + " | ".join(varied) + (" |" if varied else "|"),
             "|---|---|---|---|---|---|---|" + "---|" * len(varied)]
    for s, run in rows:
        values = [json.dumps((run.config or {}).get(k)) for k in varied]
        link = f"{quote(run.name, safe='=,+@:')}/{SUMMARY_MD}"
        lines.append(f"| [{run.name}]({link}) | {_fmt(s['best_top1'], '.2f', '%')} | "
                     f"{_fmt(s['final_top1'], '.2f', '%')} | {s['epochs']} | {s['grows']} | {s['cuts']} | "
                     f"{_fmt(s['max_train_params'], ',')} |" + "".join(f" {v} |" for v in values))
    for name, reason in failed.items():
        lines.append(f"| {name} | not reported: {reason.replace('|', '/')} |")
    lines.append("")
    (out_dir / SUMMARY_MD).write_text("\n".join(lines))
    return {"out_dir": out_dir, "trials": trials, "failed": failed, "comparison": drawn, "varied": varied,
            "files": [out_dir / COMPARISON_PNG, out_dir / SUMMARY_MD]}


def render_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Report for a run directory, or for every trial of a sweep directory (plus a comparison)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
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
