"""Reading dyrep-ray run directories for the report: JSON files into :class:`RunData`, and finding the runs of a sweep.

Only JSON is read: ``metrics.jsonl``, ``structure.json``, ``config.json``, the ``meta.json`` of
checkpoints and ``deployed.json`` (written by ``dyrep-ray convert``) when present.  No tensor file is
ever opened and no model is built.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

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

SWEEP_SEARCH_DEPTH = 4


class ReportError(UserError, ValueError):
    """Nothing to report on (no metrics.jsonl) or an unreadable run."""


#: What one trial's hostile or broken files can raise while it is read and drawn (values of the wrong type in
#: JSON reach arithmetic and formatting); such a trial is marked in a sweep report, the others are reported.
TRIAL_REPORT_ERRORS = (UserError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                       OverflowError, RecursionError)


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
    records = [r for r in records if isinstance(r, dict)]
    for record in records:
        events = record.get("events")
        if events is not None and not isinstance(events, list):
            raise ReportError(f"{path}: epoch {record.get('epoch')}: 'events' is a {type(events).__name__}, not a "
                              "list of grow/cut events; this file was not written by dyrep-ray"[:300])
        if events:  # an event that is not an object has nothing to draw
            record["events"] = [e for e in events if isinstance(e, dict)]
    return records, skipped


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
