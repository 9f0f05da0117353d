"""What every Ray Train worker of a trial runs: the ``dyrep-ray train`` loop, imported only where it runs.

The trial actor and the Train controller only pickle a reference to :func:`segment_loop`; keeping this module
free of torch/torchvision imports keeps those processes quick to start.
"""

from __future__ import annotations


def segment_loop(loop_config: dict) -> None:
    from ..distributed.trainer import train_loop_per_worker

    train_loop_per_worker(loop_config)
