"""``dyrep-ray train`` on Ray Train with fault-injection callbacks, as a real process (tests kill it).

    python -m tests.train_with_faults --sleep-epoch 2 --sleep-seconds 120 --address ADDR --output DIR --name N \\
        --set key=value ...

Runs exactly the config ``dyrep-ray train --set ...`` would, so re-running that command resumes the run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dyrep_ray.console import LOG_FORMAT
from dyrep_ray.distributed.trainer import run_distributed
from dyrep_ray.engine.config import load_config
from dyrep_ray.engine.faults import SleepAt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_with_faults")
    parser.add_argument("--address")
    parser.add_argument("--output", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--sleep-epoch", type=int, help="stall every rank mid-epoch (0-based)")
    parser.add_argument("--sleep-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    callbacks = []
    if args.sleep_epoch is not None:
        callbacks.append(SleepAt(epoch=args.sleep_epoch, seconds=args.sleep_seconds))
    run_distributed(load_config(None, args.overrides), args.output, args.name, address=args.address,
                    callbacks=callbacks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
