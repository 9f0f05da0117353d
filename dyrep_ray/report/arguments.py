"""The ``compare`` command's arguments, shared by ``dyrep-ray compare`` (report/commands.py) and ``python -m
dyrep_ray.report.compare`` (report/compare.py).

Imports nothing: building the CLI parser must not load matplotlib, which report/compare.py does.
"""

from __future__ import annotations


def add_compare_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", help="output directory (default: ./compare)")
