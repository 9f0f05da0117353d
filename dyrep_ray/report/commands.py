"""``dyrep-ray report RUN_DIR [--out DIR]`` and ``dyrep-ray compare RUN_DIR... [--out DIR]``."""

from __future__ import annotations

from .arguments import add_compare_arguments


def register(subparsers, add_common) -> None:
    r = subparsers.add_parser(
        "report", help="PNG figures + summary.md of what DyRep did to a run (or every trial of a sweep)",
        description="Structure timeline (which convs grew, when, which branches they held, when branches were cut), "
                    "accuracy/loss curves with adjust points, and parameter count during training vs the deployed "
                    "model. A directory holding several run directories (a Tune sweep) gets one sub-folder per "
                    "trial plus a val_top1 comparison. Reads JSON files only.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="run directory (with metrics.jsonl) or sweep directory")
    r.add_argument("--out", help="output directory (default: <RUN_DIR>/report)")
    add_common(r)
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser(
        "compare", help="the paper-style table of several runs (plain / DBB / DyRep): Markdown, CSV, top-1 curves",
        description="One row per run: mode, best and final val top-1, training params and MACs at the end, "
                    "training time, images/s, deployed params. Prints Markdown; writes compare.md, compare.csv "
                    "and a PNG of the val top-1 curves. Reads JSON files only (torch-free: python -m "
                    "dyrep_ray.report.compare).")
    add_compare_arguments(c)
    add_common(c)
    c.set_defaults(func=cmd_compare)


def cmd_report(args) -> int:
    from .markdown import SUMMARY_MD
    from .render import render_report

    result = render_report(args.run_dir, args.out)  # ReportError: one line, exit 2 (dyrep_ray.cli.main)
    out = result["out_dir"]
    if result["mode"] == "run":
        s = result["summary"]
        best = f"{s['best_top1']:.2f}%" if isinstance(s["best_top1"], (int, float)) else "n/a"
        print(f"dyrep-ray: report: {s['name']}: best top-1 {best}, {s['grows']} grows, {s['cuts']} cuts; "
              f"{len(result['files'])} files in {out} (see {out / SUMMARY_MD})")
    else:
        print(f"dyrep-ray: report: {len(result['trials'])} trials, comparison plot and per-trial reports in {out} "
              f"(see {out / SUMMARY_MD})")
    return 0


def cmd_compare(args) -> int:
    from .compare import print_comparison

    return print_comparison(args.run_dirs, args.out)  # ReportError: one line, exit 2
