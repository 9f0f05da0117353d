"""Ray Tune sweeps of DyRep training runs: ASHA early stopping and structure-carrying PBT.

Command line::

    dyrep-ray tune -c SWEEP.yaml [--set KEY=VALUE ...] [--output DIR] [--name NAME] [--resume] [--address A]

Python::

    from dyrep_ray.tune import load_sweep, run_sweep
    outcome = run_sweep(load_sweep("experiments/tune/demo.yaml"), "runs", "demo")
    outcome.table            # pandas DataFrame, one row per trial (also trials.csv / trials.parquet)
    outcome.best             # {"trial_id", "value", "epoch", "config", "run_dir"}; best_config.yaml

Modules: :mod:`.spec` (sweep YAML format, validated into a ``SweepSpec``) with :mod:`.sweep_file` (reading the YAML,
``--set``, the base config), :mod:`.space` (distributions) and :mod:`.sections` (resources, scheduler, search_alg
rules); :mod:`.trainable` (one ``TorchTrainer`` per trial), :mod:`.bridge` (Train checkpoints <-> Tune
checkpoints, PBT segments), :mod:`.sweep` (the Tuner),
:mod:`.results` / :mod:`.plots` (table, best config, metric plot), :mod:`.commands` (CLI).

This package is imported by Ray Train controllers and trial actors: it stays light (no torch at import).
"""

from __future__ import annotations

__all__ = ["SweepSpec", "load_sweep", "run_sweep"]


def __getattr__(name: str):
    if name in ("SweepSpec", "load_sweep"):
        from . import spec

        return getattr(spec, name)
    if name == "run_sweep":
        from .sweep import run_sweep

        return run_sweep
    raise AttributeError(name)
