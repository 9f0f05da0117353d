"""Run a sweep: connect to Ray, build the Tuner (scheduler, search algorithm, trainable), fit, summarize.

Sweep directory ``<output>/<name>/``::

    sweep.json                 the resolved sweep (base config included); ``--resume`` reads it
    tune/                      Ray Tune's experiment state, per-trial results and (PBT) bridge checkpoints
    <trial_id>/                the trial's training run: the same files as ``dyrep-ray train`` writes
    <trial_id>/seg<N>/         PBT: the run after the N-th exploit (start_checkpoint/, pbt_origin.json)
    trials.csv, trials.parquet the table of trials;   best_config.yaml  the best trial as an experiment
    <metric>_vs_epoch.png      the metric per epoch of every trial
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..distributed.trainer import ClusterError, check_resources, connect, preflight, resolve_use_gpu
from ..engine.config import ConfigError, TrainConfig
from ..engine.progress import console as console_lines
from ..rundir.layout import LEASE_FILE, LOCK_FILE, SWEEP_FILE, TUNE_DIR
from ..rundir.storage import RunStorage, resolve_filesystem
from .console import SweepConsole
from .space import Distribution
from .spec import TIME_ATTR, SweepSpec

logger = logging.getLogger(__name__)

#: Tune checkpoints kept per trial under PBT (PBT restores from them; fewer risks losing a donor's).
TUNE_CHECKPOINTS_TO_KEEP = 4


def local_ray_cpus() -> int:
    """Logical CPUs for a Ray the tune command starts itself: Tune-over-Train needs some oversubscription."""
    return max(4, os.cpu_count() or 1)


class ClampMutations:
    """PBT ``custom_explore_fn``: keep perturbed values inside their distributions (x1.2 may leave them)."""

    def __init__(self, mutations: dict[str, Distribution]):
        self.mutations = mutations

    def __call__(self, config: dict) -> dict:
        for key, dist in self.mutations.items():
            if key in config:
                config[key] = dist.clamp(config[key])
        return config


def trial_dirname(trial) -> str:
    from ..rundir.lock import validate_run_name

    return validate_run_name(trial.trial_id, "trial")  # becomes a directory: one safe path component


def trial_name(trial) -> str:
    return trial.trial_id


@dataclass
class SweepOutcome:
    sweep_dir: str
    spec: SweepSpec
    records: list = field(default_factory=list)
    table: object = None  # pandas.DataFrame
    best: dict | None = None
    files: dict = field(default_factory=dict)
    interrupted: bool = False  # some trials did not end: continue with --resume


def _build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s["type"] == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=s["max_t"], grace_period=s["grace_period"],
                             reduction_factor=s["reduction_factor"], brackets=s["brackets"])
    if s["type"] == "pbt":
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=s["perturbation_interval"],
            burn_in_period=s["burn_in_period"],
            hyperparam_mutations={k: d.to_mutation() for k, d in spec.mutations.items()},
            quantile_fraction=s["quantile_fraction"], resample_probability=s["resample_probability"],
            perturbation_factors=tuple(s["perturbation_factors"]), custom_explore_fn=ClampMutations(spec.mutations),
            synch=s["synch"])
    return FIFOScheduler()


def _build_search_alg(spec: SweepSpec, concurrency: int):
    """(search algorithm, TuneConfig.max_concurrent_trials): the random generator limits concurrency itself
    (Tune ignores max_concurrent_trials for it), model-based searchers get Tune's ConcurrencyLimiter."""
    alg, seed = spec.search_alg["type"], spec.search_alg.get("seed")
    if alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), concurrency
    if alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed), concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed), None


def population_size(spec: SweepSpec) -> int:
    grid = 1
    for dist in spec.search_space.values():
        if dist.kind == "grid":
            grid *= len(dist.values)
    return grid * spec.num_samples


def plan_concurrency(spec: SweepSpec, use_gpu: bool) -> int:
    """Trials at once: what the user asked, capped by what the cluster can run (never 0)."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        capacity = int(resources.get("GPU", 0) // spec.workers)
    else:
        capacity = int(resources.get("CPU", 0) // (spec.workers * spec.cpus_per_worker) + 1e-9)
    if capacity < 1:
        need = f"{spec.workers} GPU(s)" if use_gpu else f"{spec.workers * spec.cpus_per_worker:g} CPU(s)"
        have = resources.get("GPU" if use_gpu else "CPU", 0)
        raise ClusterError(f"one trial needs {need} but the cluster has {have:g}; "
                           f"lower resources.workers / resources.cpus_per_worker or add nodes")
    wanted = spec.max_concurrent_trials or capacity
    if wanted > capacity:
        logger.warning("max_concurrent_trials=%d but the cluster runs at most %d trial(s) of %d %s worker(s) at "
                       "once; using %d", wanted, capacity, spec.workers, "GPU" if use_gpu else "CPU", capacity)
    concurrency = min(wanted, capacity, population_size(spec))
    if spec.scheduler_type == "pbt" and concurrency < population_size(spec):
        logger.warning("PBT population of %d runs %d at a time: trials will be paused and resumed from their "
                       "checkpoints", population_size(spec), concurrency)
    return concurrency


#: Keys whose values decide which models and data a trial needs (each combination is preflighted).
PREFLIGHT_KEYS = ("dataset", "data_dir", "model", "num_classes")


def preflight_sweep(spec: SweepSpec) -> None:
    """Every model / dataset a trial can get exists (and its data dir), before anything is written or started."""

    def values(key: str) -> list:
        dist = spec.search_space.get(key)
        if dist is None:
            return [spec.base_config[key]]
        return list(dist.values)  # str / Optional[int] keys can only be searched with choice / grid

    for combination in itertools.product(*(values(key) for key in PREFLIGHT_KEYS)):
        preflight(spec.trial_config(dict(zip(PREFLIGHT_KEYS, combination))))


def _probe_config(spec: SweepSpec) -> TrainConfig:
    return TrainConfig.from_dict({**spec.base_config, "workers": spec.workers, "use_gpu": spec.use_gpu,
                                  "storage_path": None})


def prepare_sweep(spec: SweepSpec | None, output: str, name: str, resume: bool) -> tuple[SweepSpec, RunStorage]:
    """Check the sweep directory (``resume``: read back the sweep as it was started); writes nothing."""
    from ..rundir.lock import RunDirError, validate_run_name

    validate_run_name(name, "sweep")
    root = RunStorage(output, name)
    try:
        saved = root.read_text(SWEEP_FILE)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {root.path(SWEEP_FILE)} ({exc}); check --output/--name".splitlines()[0]) \
            from None
    tune_exists = root.fs.get_file_info(root.path(TUNE_DIR)).type.name == "Directory"
    if resume:
        if saved is None:
            raise ConfigError(f"nothing to resume: {root.root} holds no {SWEEP_FILE}; check --output/--name")
        try:
            stored = SweepSpec.from_json(saved)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ConfigError(f"{root.path(SWEEP_FILE)} is corrupt ({type(exc).__name__}: {exc}); it cannot be "
                              "resumed: start a new sweep with another --name".splitlines()[0]) from None
        if spec is not None and spec.to_json() != stored.to_json():
            logger.warning("--resume continues the sweep as it was started (%s); the given sweep file differs "
                           "and is ignored", root.path(SWEEP_FILE))
        return stored, root
    if spec is None:
        raise ConfigError("dyrep-ray tune needs a sweep file: -c experiments/tune/demo.yaml")
    if tune_exists or saved is not None:
        raise ConfigError(f"sweep directory {root.root} already exists; pass --resume to continue it, or choose "
                          f"another --name / --output")
    info = root.fs.get_file_info(root.root)
    if info.type.name == "File" or (info.type.name == "Directory" and root.list_dirs() + _files(root)):
        raise RunDirError(f"{root.root} exists and is not a dyrep-ray sweep (no {SWEEP_FILE}); choose another "
                          "--name or --output")
    return spec, root


def _files(root: RunStorage) -> list[str]:
    import pyarrow.fs as pafs

    entries = root.fs.get_file_info(pafs.FileSelector(root.root, allow_not_found=True))
    # Our own writer lock (taken before this check) does not make the directory somebody else's.
    return [e.base_name for e in entries if e.type == pafs.FileType.File and e.base_name not in (LOCK_FILE, LEASE_FILE)]


def run_sweep(spec: SweepSpec | None, output: str, name: str, *, resume: bool = False,
              address: str | None = None, verbose: int = 1, callbacks: Sequence = (),
              console: SweepConsole | None = None) -> SweepOutcome:
    """Run (or ``resume``) the sweep under ``<output>/<name>``; returns the table and written files.

    ``callbacks``: :class:`~dyrep_ray.engine.callbacks.TrainerCallback` instances every trial's workers run.
    ``verbose``: Ray Tune's own console (0, 1 or 2).  ``console``: our quiet console instead
    (:class:`~dyrep_ray.tune.console.SweepConsole`: Tune's reporter, Ray's routine lines and every trial's
    worker and controller INFO lines off the terminal; they stay in Ray's logs).
    """
    from ..rundir.lock import RunLock, validate_run_name

    if spec is not None:
        preflight_sweep(spec)
    validate_run_name(name, "sweep")
    # One writer per sweep directory, as for a run directory (flock locally, a lease marker on object stores).
    lock = RunLock(RunStorage(output, name), "sweep").acquire()
    try:
        return _run_sweep_locked(spec, output, name, resume=resume, address=address, verbose=verbose,
                                 callbacks=callbacks, console=console)
    finally:
        lock.release()


def _run_sweep_locked(spec: SweepSpec | None, output: str, name: str, *, resume: bool, address: str | None,
                      verbose: int, callbacks: Sequence, console: SweepConsole | None) -> SweepOutcome:
    from ray import tune

    from .results import collect_records, sweep_interrupted, write_results
    from .signing import SignSweepCallback, load_secret, signing_while_fitting, verify_sweep
    from .trainable import make_trainable

    spec, root = prepare_sweep(spec, output, name, resume)
    if resume:  # before anything of tune/ is unpickled (Tuner.can_restore only checks that tuner.pkl exists)
        verify_sweep(root)
    else:
        load_secret(create=True)  # a sweep that could never be signed (unwritable key dir) fails now, not at the end
    spec_json = spec.to_json()  # as given (use_gpu may be "auto"): what --resume compares against
    from ..tracking import DriverTrackingEnvironment

    callbacks = [DriverTrackingEnvironment(spec.base_config.get("mlflow_tracking_uri")), *callbacks]
    train_log_level = None
    if console is not None:
        from ..distributed.console import QUIET_RAY_TRAIN_LOG_LEVEL, WorkerConsole, quiet_ray_driver

        console.spec, train_log_level = spec, QUIET_RAY_TRAIN_LOG_LEVEL
        callbacks = [WorkerConsole(verbose=False), *callbacks]
        quiet_ray_driver(trial_failures_to_log=True)
    started = connect(address, num_cpus=local_ray_cpus())  # num_cpus only matters for a new local Ray
    if console is not None:
        from ..distributed.console import filter_forwarded_output

        filter_forwarded_output(trial_failures_to_log=True)
    logger.info("Ray: %s", started)
    if spec.use_gpu is None:
        spec.use_gpu = resolve_use_gpu(_probe_config(spec))
    probe = _probe_config(spec)
    check_resources(probe, bool(spec.use_gpu))
    concurrency = plan_concurrency(spec, bool(spec.use_gpu))
    sweep_uri = root.root if root.local else output.rstrip("/") + "/" + name
    if not resume:
        root.write_text(SWEEP_FILE, spec_json)
    trainable = make_trainable(spec, sweep_uri, callbacks, train_log_level=train_log_level)
    tune_callbacks = [SignSweepCallback(), *([console] if console is not None else [])]
    reporter = console.reporter() if console is not None else None
    tune_verbose = 1 if reporter is not None else verbose  # 1: Tune consults the reporter (it prints nothing else)
    fs, fs_path = resolve_filesystem(sweep_uri)
    tune_path = f"{fs_path}/{TUNE_DIR}"
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(tune_path, storage_filesystem=None if root.local else fs):
            raise ConfigError(f"nothing to resume: {tune_path} holds no Tune experiment state")
        console_lines.info("tune %s: resuming %s (unfinished and errored trials continue), metric %s (%s)",
                           name, root.root, spec.metric, spec.mode)
        tuner = Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                              storage_filesystem=None if root.local else fs)
        _use_console_of_this_command(tuner, tune_callbacks, reporter, tune_verbose)
    else:
        console_lines.info("tune %s: %d trial(s) of %s on %s (%s scheduler, %s search, %d at a time, %s %s "
                           "worker(s) each), metric %s (%s), sweep dir %s", name, population_size(spec),
                           spec.base_config["model"], spec.base_config["dataset"], spec.scheduler_type,
                           spec.search_alg["type"], concurrency, spec.workers, "GPU" if spec.use_gpu else "CPU",
                           spec.metric, spec.mode, root.root)
        search_alg, max_concurrent = _build_search_alg(spec, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=_build_scheduler(spec),
                search_alg=search_alg, num_samples=spec.num_samples,
                max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname,
                trial_name_creator=trial_name, reuse_actors=False),
            run_config=tune.RunConfig(
                callbacks=tune_callbacks,
                name=TUNE_DIR, storage_path=fs_path, storage_filesystem=None if root.local else fs,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=TUNE_CHECKPOINTS_TO_KEEP if spec.scheduler_type == "pbt" else None),
                progress_reporter=reporter, verbose=tune_verbose),
        )
    # Signed while Ray writes (SignSweepCallback, from the first step on) and after fit, also when it raises or
    # is interrupted: --resume unpickles nothing that this user's dyrep-ray did not sign.
    with signing_while_fitting(root), warnings.catch_warnings(), tune_output_engine(legacy=reporter is not None):
        warnings.filterwarnings("ignore", message=".*reuse_actors.*")  # PBT advice: an actor holds a TorchTrainer
        results = tuner.fit()
    records = collect_records(results, spec, sweep_uri)
    outcome = SweepOutcome(sweep_dir=root.root, spec=spec, records=records, interrupted=sweep_interrupted(results))
    write_results(outcome, root)
    return outcome


def _use_console_of_this_command(tuner, callbacks: list, reporter, verbose: int) -> None:
    """A restored Tuner carries the pickled RunConfig of the sweep's first start: give it this command's console
    (Ray has no public setter; without its internals the first start's console stays, with a warning)."""
    try:
        run_config = tuner._local_tuner.get_run_config()
    except AttributeError:
        logger.warning("this Ray cannot change a restored sweep's console; it shows what its first start showed")
        return
    run_config.callbacks = list(callbacks)
    run_config.progress_reporter = reporter
    run_config.verbose = verbose


#: Ray Tune's switch between its new output engine (default) and the one that takes a custom progress reporter.
TUNE_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


@contextlib.contextmanager
def tune_output_engine(legacy: bool):
    """While Tune runs: its reporter interface (``legacy``) for our console, else its new engine, as it was."""
    before = os.environ.get(TUNE_NEW_OUTPUT_ENV)
    if legacy:
        os.environ[TUNE_NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if legacy:
            if before is None:
                os.environ.pop(TUNE_NEW_OUTPUT_ENV, None)
            else:
                os.environ[TUNE_NEW_OUTPUT_ENV] = before
