"""The end of a sweep: one record per trial, the trials table (CSV + Parquet), the best config as an experiment YAML.

A record combines what Tune saw (the metrics every epoch reported, errors) with what the trial's run directory
holds (grows, cuts, parameter counts from ``metrics.jsonl`` and checkpoint meta of its latest segment).
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.summary import summarize
from ..errors import UserError
from ..rundir.files import plain_params_from, read_metrics
from ..rundir.layout import BEST_CONFIG, SWEEP_SUMMARY, TRIALS_PARQUET
from ..rundir.layout import TRIALS_CSV as TABLE_CSV
from .bridge import existing_segments, latest_origin, segment_storage
from .spec import TIME_ATTR, SweepSpec

logger = logging.getLogger(__name__)

STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped", "error"
STATUS_UNFINISHED = "unfinished"  # the sweep was interrupted before this trial ended: --resume continues it


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    config: dict  # the searched keys' final values
    reported: list = field(default_factory=list)  # one dict per Tune report (epoch, metric, segment, ...)
    curve: list = field(default_factory=list)  # the trial's epochs: {"epoch", <metric>, "segment"}, for best/plot
    summary: dict = field(default_factory=dict)  # engine.summary.summarize of the latest segment's history
    error: str = ""
    segments: int = 1
    exploits: int = 0
    donor: str = ""
    donor_epoch: int | None = None
    run_dir: str = ""
    best_value: float | None = None
    best_epoch: int | None = None
    final_value: float | None = None


def error_line(error: BaseException | None) -> str:
    """One line for a trial's error: our TrialError message when present, else the last traceback line."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrialError:" in line:
            return line.split("TrialError:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, else None (a missing, non-numeric, NaN or infinite metric)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _reported(result) -> list[dict]:
    df = getattr(result, "metrics_dataframe", None)
    if df is None or len(df) == 0:
        return []
    if "training_iteration" in df.columns:
        df = df.sort_values("training_iteration")
    rows = df.to_dict("records")
    return [r for r in rows if finite_or_none(r.get(TIME_ATTR)) is not None]


def _tune_states(results) -> dict[str, str]:
    """Tune's status per trial id (TERMINATED, ERROR, RUNNING, PAUSED, PENDING); {} if Ray hides it.

    ``ResultGrid`` has no public per-trial status; its private ``_experiment_analysis`` has.  Only its absence
    (a Ray that renamed it) falls back to what the results show.
    """
    analysis = getattr(results, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None)
    if trials is None:
        logger.warning("this Ray's ResultGrid exposes no trial states; unfinished trials show as stopped")
        return {}
    return {t.trial_id: t.status for t in trials}


def sweep_interrupted(results) -> bool:
    """True when some trials neither finished nor failed (Ctrl-C, a crash of the driver)."""
    return results.num_terminated + results.num_errors < len(results)


def _curve(record: TrialRecord, history: list[dict], metric: str) -> list[dict]:
    """The trial's metric per epoch.  Never exploited: its run's own history (complete even when a report was
    lost to an interruption).  Exploited (PBT): what it reported to Tune -- the run history of a later segment
    starts with the donor's epochs, which this trial did not train."""
    if record.exploits == 0 and history:
        return [{TIME_ATTR: m[TIME_ATTR], metric: m.get(metric), "segment": 0} for m in history if TIME_ATTR in m]
    return [{TIME_ATTR: r[TIME_ATTR], metric: r.get(metric), "segment": r.get("segment", 0)} for r in record.reported]


def collect_records(results, spec: SweepSpec, sweep_uri: str) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial of a Tune ``ResultGrid``."""
    states = _tune_states(results)
    records = []
    for result in results:
        trial_id = Path(str(result.path)).name
        config = dict(result.config or {})
        try:
            cfg = spec.trial_config(config)
            searched = {k: getattr(cfg, k) for k in spec.search_space}
        except UserError:  # an invalid sampled config: show what was sampled
            searched = {k: config.get(k) for k in spec.search_space}
        record = TrialRecord(trial_id=trial_id, status="", config=searched, reported=_reported(result),
                             error=error_line(result.error))
        segments = existing_segments(sweep_uri, trial_id)
        record.segments = max(len(segments), 1)
        record.exploits, origin = latest_origin(sweep_uri, trial_id)
        if origin:
            record.donor, record.donor_epoch = origin["donor_trial_id"], int(origin["donor_epoch"])
        history: list[dict] = []
        if segments:
            storage = segment_storage(sweep_uri, trial_id, segments[-1])
            record.run_dir = storage.root
            try:
                history = read_metrics(storage)
                # Training runs up to an epoch ahead of Tune: a trial stopped by the scheduler at epoch e may
                # have finished e+1 before its run was aborted. The table shows what Tune decided on.
                seen = max((int(r[TIME_ATTR]) for r in record.reported), default=None)
                if seen is not None:
                    history = [m for m in history if int(m.get(TIME_ATTR, 0)) <= seen]
                record.summary = summarize(history, plain_params_from(storage))
            except (ValueError, OSError) as exc:
                logger.warning("trial %s: cannot read its run files (%s)", trial_id, exc)
        record.curve = _curve(record, history, spec.metric)
        values = [(int(r[TIME_ATTR]), finite_or_none(r.get(spec.metric))) for r in record.curve]
        values = [(e, v) for e, v in values if v is not None]
        if values:
            pick = max if spec.mode == "max" else min
            record.best_epoch, record.best_value = pick(values, key=lambda ev: ev[1])
            record.final_value = values[-1][1]
        epochs_done = max([record.summary.get("epochs", 0)] + [e for e, _ in values])
        state = states.get(trial_id)
        if record.error or state == "ERROR":
            record.status = STATUS_ERROR
        elif state is not None and state != "TERMINATED":
            record.status = STATUS_UNFINISHED
        elif epochs_done >= spec.epochs:
            record.status = STATUS_COMPLETED
        else:
            record.status = STATUS_STOPPED
        records.append(record)
    records.sort(key=lambda r: r.trial_id)
    return records


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    scored = [r for r in records if r.best_value is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.best_value)


def trials_table(records: list[TrialRecord], spec: SweepSpec):
    """pandas DataFrame: one row per trial."""
    import pandas as pd

    metric = spec.metric
    rows = []
    for r in records:
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status}
        row.update(r.config)
        row.update({
            f"best_{metric}": r.best_value, "best_epoch": r.best_epoch, f"final_{metric}": r.final_value,
            "epochs": r.summary.get("epochs", 0), "grows": r.summary.get("grows", 0),
            "cuts": r.summary.get("cuts", 0), "final_train_params": r.summary.get("final_train_params"),
            "deployed_params": r.summary.get("deployed_params"),
        })
        if spec.scheduler_type == "pbt":
            row.update({"exploits": r.exploits, "last_donor": r.donor or None, "donor_epoch": r.donor_epoch})
        row.update({"run_dir": r.run_dir, "error": r.error or None})
        rows.append(row)
    df = pd.DataFrame(rows)
    for column in ("best_epoch", "final_train_params", "deployed_params", "donor_epoch"):
        if column in df.columns:
            df[column] = df[column].astype("Int64")
    return df


def format_table(df, spec: SweepSpec) -> str:
    """The table as printed by the CLI (long paths and errors shortened)."""
    shown = df.drop(columns=["run_dir"], errors="ignore").copy()
    if "error" in shown.columns:
        shown["error"] = shown["error"].map(lambda e: "" if e is None or e != e else
                                            (str(e) if len(str(e)) <= 60 else str(e)[:57] + "..."))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def best_config_yaml(record: TrialRecord, spec: SweepSpec, sweep_name: str) -> str:
    cfg = spec.trial_config(record.config)
    searched = ", ".join(f"{k}={v}" for k, v in record.config.items())
    header = [
        f"# Best trial {record.trial_id} of sweep {sweep_name!r}: {spec.metric} {record.best_value:.4g} "
        f"({spec.mode}) at epoch {record.best_epoch}.",
        f"# Searched: {searched}",
        "# Run it: dyrep-ray train -c best_config.yaml",
    ]
    if spec.scheduler_type == "pbt" and record.exploits:
        header.append(f"# PBT: these are the values after its last exploit (of {record.donor} at epoch "
                      f"{record.donor_epoch}); the trial's hyper-parameters changed during training.")
    import yaml

    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def _write_bytes(storage, relpath: str, data: bytes) -> str:
    target = storage.path(relpath)
    storage.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    with storage.fs.open_output_stream(target) as f:
        f.write(data)
    return target


def write_results(outcome, storage) -> None:
    """Fill ``outcome.table/best/files``: trials.csv, trials.parquet, best_config.yaml, the metric plot."""
    from .plots import plot_metric

    spec, records = outcome.spec, outcome.records
    df = trials_table(records, spec)
    outcome.table = df
    outcome.files["csv"] = _write_bytes(storage, TABLE_CSV, df.to_csv(index=False).encode())
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    outcome.files["parquet"] = _write_bytes(storage, TRIALS_PARQUET, buffer.getvalue())
    best = best_record(records, spec.mode)
    sweep_name = Path(storage.root).name
    if best is not None:
        storage.write_text(BEST_CONFIG, best_config_yaml(best, spec, sweep_name))
        outcome.files["best_config"] = storage.path(BEST_CONFIG)
        outcome.best = {"trial_id": best.trial_id, "value": best.best_value, "epoch": best.best_epoch,
                        "config": best.config, "run_dir": best.run_dir}
    png = plot_metric(records, spec, title=f"sweep {sweep_name}")
    if png:
        outcome.files["plot"] = _write_bytes(storage, f"{spec.metric}_vs_epoch.png", png)
    storage.write_text(SWEEP_SUMMARY, json.dumps({"best": outcome.best, "files": outcome.files,
                                                   "trials": len(records)}, indent=1, default=str))
