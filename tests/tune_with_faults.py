"""``dyrep-ray tune`` with a fault-injection callback in every trial's workers, as a real process.

    python -m tests.tune_with_faults --raise-epoch 0 --marker PATH -- tune -c SWEEP --output DIR ...

Runs exactly what ``dyrep-ray tune ...`` runs (the same CLI entry point, console and exit code), with
:class:`~dyrep_ray.engine.faults.RaiseAt` added to the trials' callbacks: rank 0 of the first trial to reach the
middle of that epoch (0-based) raises, once (the marker file records that it fired).
"""

from __future__ import annotations

import argparse
import functools
import sys

from dyrep_ray import cli
from dyrep_ray.engine.faults import RaiseAt
from dyrep_ray.tune import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tune_with_faults")
    parser.add_argument("--raise-epoch", type=int, required=True, help="raise mid-epoch (0-based) on rank 0")
    parser.add_argument("--marker", required=True, help="file written when the fault fires; it fires once")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the dyrep-ray arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    fault = RaiseAt(epoch=args.raise_epoch, rank=0, marker=args.marker)
    # the tune command imports run_sweep from its module when it runs
    sweep.run_sweep = functools.partial(sweep.run_sweep, callbacks=[fault])
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
