"""The run directory's layout: every file and directory name dyrep-ray writes, in one place.

Torch-free and Ray-free, so the CLI, ``report`` and ``compare`` can read run directories without importing
either.  A run directory (``<output>/<name>/``) holds::

    config.json            the resolved TrainConfig
    metrics.jsonl          one JSON object per completed epoch (rewritten from history: no duplicates on resume)
    structure.json         the current structure graph
    checkpoint_epochNNNN/  meta.json, structure.json, state.pt, MANIFEST.json (written last)
    deployed.safetensors   written by ``dyrep-ray convert``, with deployed.json beside it
    report/                written by ``dyrep-ray report``
    train.log              the driver's log of every ``dyrep-ray train`` of this run (appended on resume)
    tensorboard/           TensorBoard event files (config key ``tensorboard``)
    tracking.json          the MLflow run this run logs to (config key ``mlflow_tracking_uri``)

A sweep directory holds ``sweep.json``, one run directory per trial, ``trials.csv`` / ``trials.parquet``,
``best_config.yaml``, ``summary.json`` and ``tune.signature.json`` (see tune/signing.py).
"""

from __future__ import annotations

# Run directory files.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STRUCTURE_FILE = "structure.json"
DEPLOYED_WEIGHTS = "deployed.safetensors"
DEPLOYED_SIDECAR = "deployed.json"
REPORT_DIR = "report"
#: The key of the report every rank makes after a preemption checkpoint (not an epoch's result: Tune skips it).
PREEMPTED_METRIC = "preempted_at_step"
#: The key of multiply-accumulates per image (``deployed.json``: trained/deployed/plain; a metrics row).
MACS_KEY = "macs"
#: The same count under the name run directories written before it was called MACs use (read, never written).
LEGACY_MACS_KEY = "flops"
TRAIN_LOG = "train.log"  # the driver's (or --local process's) log of the run, console filtering aside
TRACKING_FILE = "tracking.json"  # {"mlflow": {"tracking_uri", "experiment_id", "run_id"}}: resume + convert
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files

# Checkpoint directories and the files inside one.
CHECKPOINT_PREFIX = "checkpoint_"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
GRAPH_FILE = "structure.json"
MANIFEST_FILE = "MANIFEST.json"

# The writer lock of a run or sweep directory (see rundir/lock.py): a flock'ed file on local file systems,
# a lease marker on object stores.
LOCK_FILE = ".dyrep-ray.lock"
LEASE_FILE = ".dyrep-ray.lease.json"

# Sweep directory files.
SWEEP_FILE = "sweep.json"
TUNE_LOG = "tune.log"  # the tune command's log of the sweep, console filtering aside
TRIALS_CSV = "trials.csv"
TRIALS_PARQUET = "trials.parquet"
BEST_CONFIG = "best_config.yaml"
TUNE_DIR = "tune"
SEGMENT_PREFIX = "seg"  # <trial>/seg<N>/: the run after a trial's N-th PBT exploit
START_CHECKPOINT_DIR = "start_checkpoint"
SWEEP_SUMMARY = "summary.json"
SWEEP_SIGNATURE = "tune.signature.json"  # HMAC of every file under tune/ (Ray unpickles them on --resume)
BRIDGE_FILE = "bridge.json"
PBT_ORIGIN_FILE = "pbt_origin.json"


def checkpoint_dir_name(epoch: int) -> str:
    """Name of the checkpoint directory written after ``epoch`` (1-based) epochs."""
    return f"{CHECKPOINT_PREFIX}epoch{epoch:04d}"
