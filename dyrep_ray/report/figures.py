"""Drawing what DyRep did to a run (matplotlib object API, Agg canvas: no pyplot global state, no display).

Drawing functions take a matplotlib ``Axes``/``Figure`` and return counts of what they drew (e.g.
``grow_markers``), so tests can check the pictures show the run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .history import Timeline, finite
from .runs import RunData

MAX_BRANCHES = 7  # len(dyrep_ray.rep.BRANCH_NAMES); a test keeps them equal (report stays torch-free)
CELL_TEXT_MAX = 40  # write branch counts in cells while rows and epochs stay below this
DPI = 110
PLOT_TEXT_MAX = 80  # characters of a run name / model / conv path drawn into a figure
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
            if finite(values):
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
    if finite(top1):
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

    pts = [(int(m["epoch"]), m["params"]) for m in metrics if finite([m.get("params")])]
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
    ranked = sorted(runs, key=lambda r: -max(finite(m.get(metric) for m in r.metrics), default=-math.inf))
    drawn = 0
    for run in ranked:
        pts = [(int(m["epoch"]), m[metric]) for m in run.metrics if finite([m.get(metric)])]
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
