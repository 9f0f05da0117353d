"""The Markdown of a report: a run's ``summary.md``, a sweep's ranked table, and the file names they link."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import quote

from ..rundir.layout import DEPLOYED_SIDECAR, METRICS_FILE, SEGMENT_PREFIX, STRUCTURE_FILE
from .history import Timeline
from .runs import RunData

TIMELINE_PNG = "structure_timeline.png"
CURVES_PNG = "curves.png"
PARAMS_PNG = "params.png"
COMPARISON_PNG = "comparison_val_top1.png"
SUMMARY_MD = "summary.md"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def md_text(value) -> str:
    """``value`` as inert Markdown table text: control characters (terminal escapes, newlines that would break
    the table) shown as ``\\xNN``, ``|`` and backticks escaped; the values come from files anyone can edit."""
    text = _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return text.replace("`", "'").replace("|", "\\|")


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _names(value) -> list:
    """A branch list from a run's files: a list, else nothing (a string would be split into characters)."""
    return value if isinstance(value, list) else []


def summary_markdown(run: RunData, s: dict, tl: Timeline) -> str:
    plain = s["plain_params"]
    overhead = (f" (+{100.0 * (s['max_train_params'] - plain) / plain:.1f}% at most)"
                if plain and s["max_train_params"] else "")
    lines = [
        f"# DyRep report: {md_text(run.name)}",
        "",
        f"Model `{md_text(s['model'])}` on `{md_text(s['dataset'])}`, {s['epochs']} epoch(s) recorded in "
        f"`{METRICS_FILE}`.",
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
            branches = ", ".join(map(md_text, _names(e.get("branches"))))
            if e.get("op") == "cut":
                branches = f"cut {branches}" + (" (collapsed to a conv)" if e.get("collapsed") else
                                                f"; kept {', '.join(map(md_text, _names(e.get('remaining'))))}")
            lines.append(f"| {epoch} | {md_text(e.get('op'))} | `{md_text(e.get('path'))}` | {branches} |")
        lines.append("")
    if s["final_blocks"]:
        lines += [f"## Final structure (`{STRUCTURE_FILE}`)", "", "| conv | branches |", "|---|---|"]
        lines += [f"| `{md_text(p)}` | {', '.join(map(md_text, _names(b)))} |" for p, b in s["final_blocks"].items()]
        lines.append("")
    if s["unexplained_blocks"]:
        lines += [f"Note: {len(s['unexplained_blocks'])} block(s) in `{STRUCTURE_FILE}` have no grow event in "
                  f"`{METRICS_FILE}` (e.g. inherited from a PBT donor): "
                  f"{', '.join(map(md_text, s['unexplained_blocks'][:5]))}", ""]
    if run.run_dir.name != run.name and re.fullmatch(rf"{SEGMENT_PREFIX}\d+", run.run_dir.name):
        lines += [f"Note: PBT trial; this report reads its newest segment `{run.run_dir.name}/`, whose history "
                  "includes the epochs inherited from the donor.", ""]
    if run.skipped_lines:
        lines += [f"Note: {run.skipped_lines} unreadable line(s) of `{METRICS_FILE}` were skipped.", ""]
    return "\n".join(lines)


def sweep_markdown(root: Path, runs: list[RunData], summaries: dict[str, dict], varied: list[str],
                   failed: dict[str, str]) -> str:
    """The sweep's ``summary.md``: trials ranked by best top-1, the config keys they varied, the trials left out."""
    rows = sorted(((summaries[r.name], r) for r in runs),
                  key=lambda t: -(t[0]["best_top1"] if isinstance(t[0]["best_top1"], (int, float)) else -math.inf))
    lines = [f"# DyRep sweep report: {md_text(root.name)}", "", f"{len(runs)} trial(s) found under `{md_text(root)}`.",
             "",
             f"![val_top1 per trial]({COMPARISON_PNG})", "",
             "| trial | best top-1 | final top-1 | epochs | grows | cuts | max train params | "
             + " | ".join(varied) + (" |" if varied else "|"),
             "|---|---|---|---|---|---|---|" + "---|" * len(varied)]
    for s, run in rows:
        values = [json.dumps((run.config or {}).get(k)) for k in varied]
        link = f"{quote(run.name, safe='=,+@:')}/{SUMMARY_MD}"
        lines.append(f"| [{md_text(run.name)}]({link}) | {_fmt(s['best_top1'], '.2f', '%')} | "
                     f"{_fmt(s['final_top1'], '.2f', '%')} | {s['epochs']} | {s['grows']} | {s['cuts']} | "
                     f"{_fmt(s['max_train_params'], ',')} |" + "".join(f" {v} |" for v in values))
    for name, reason in failed.items():
        lines.append(f"| {md_text(name)} | not reported: {md_text(reason.replace('|', '/'))} |")
    lines.append("")
    return "\n".join(lines)
