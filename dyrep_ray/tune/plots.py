"""The metric of every trial against its epoch (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import logging

from .spec import TIME_ATTR, SweepSpec

logger = logging.getLogger(__name__)


def plot_metric(records, spec: SweepSpec, title: str = "") -> bytes | None:
    """PNG bytes of ``spec.metric`` vs epoch, one line per trial (PBT exploits marked), or None without data."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for record in records:
        points = [(float(r[TIME_ATTR]), float(r[spec.metric])) for r in record.curve
                  if r.get(spec.metric) is not None and r.get(spec.metric) == r.get(spec.metric)]
        if not points:
            continue
        xs, ys = zip(*points)
        label = f"{record.trial_id} ({record.status})"
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=label,
                        linestyle="--" if record.status != "completed" else "-")
        # PBT: the first epoch of every new segment is where the trial continued from a donor's checkpoint
        previous = None
        for r in record.curve:
            segment = r.get("segment")
            if previous is not None and segment is not None and segment != previous and r.get(spec.metric) is not None:
                ax.plot([float(r[TIME_ATTR])], [float(r[spec.metric])], marker="*", markersize=12,
                        color=line.get_color(), linestyle="none")
            previous = segment if segment is not None else previous
        drawn += 1
    if not drawn:
        logger.warning("no trial reported %s: no plot", spec.metric)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(title + (" (* = PBT exploit)" if spec.scheduler_type == "pbt" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
