"""The console of a Ray run: the driver prints one line per epoch; Ray's routine lines stay in Ray's logs.

Ray forwards every worker's and the Train controller's stdout/stderr to the driver.  By default (not
``--verbose``):

* workers (:class:`WorkerConsole`): their console handlers pass warnings only; INFO records still reach Ray
  Train's application log files (``<ray session>/logs/train/``) -- Ray's ``Reporting training result ...`` and
  ``Checkpoint successfully created ...`` lines among them;
* the Train controller: ``RunConfig(logging_config=LoggingConfig(log_level=...))`` from
  :data:`RAY_TRAIN_LOG_LEVEL_ENV` (Ray's system log files keep every level);
* the driver drops forwarded lines known to be harmless (:data:`dyrep_ray.console.HARMLESS_PATTERNS`); Ray's
  own per-process ``.out``/``.err`` files keep them;
* Ray's transient retry noise on a slow cluster (:data:`dyrep_ray.console.TRANSIENT_PATTERNS`,
  :data:`~dyrep_ray.console.TRANSIENT_ACTORS`) goes to the run's log (``train.log``/``tune.log``) instead of the
  console; if it goes on for :data:`SLOW_CLUSTER_AFTER_S`, one console warning says so (:class:`SlowClusterNotice`);
* a sweep's console: Ray's own reports of a failed trial (:data:`dyrep_ray.console.TRIAL_FAILURE_PATTERNS`: the
  worker's traceback, Tune's "Trial task failed") go to ``tune.log``; the console's one ``trial <id> failed`` line
  names the cause and the trial's error file;
* the epoch lines come from the run's ``metrics.jsonl`` (:class:`EpochFollower`), read by the driver, so they
  carry no worker prefix and appear once however many workers there are.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ..console import (
    TRIAL_FAILURE_PATTERNS,
    TracebackContinuations,
    drop_exit_in_finalizers,
    is_harmless,
    is_routine,
    is_transient_batch,
    is_trial_failure_report,
    split_records,
    split_transient,
    unfinished_finalizer_record,
)
from ..engine.callbacks import TrainerCallback
from ..engine.progress import EPOCH_LINE, console, epoch_line
from ..rundir.files import parse_metrics
from ..rundir.layout import METRICS_FILE
from ..rundir.storage import RunStorage

logger = logging.getLogger(__name__)

#: Level of Ray Train's ``ray.train`` console output (controller and workers), read when the RunConfig is built.
RAY_TRAIN_LOG_LEVEL_ENV = "DYREP_RAY_TRAIN_LOG_LEVEL"
DEFAULT_RAY_TRAIN_LOG_LEVEL = "INFO"
QUIET_RAY_TRAIN_LOG_LEVEL = "WARNING"
#: Seconds between two reads of metrics.jsonl by the driver.
FOLLOW_INTERVAL_S = 1.0
#: Name under which ``ray.init(log_to_driver=True)`` registers the printer of forwarded worker output.
RAY_PRINTER = "ray_print_logs"
#: Ray's transient retry noise going on this long (seconds from the first such line) is worth one console line.
SLOW_CLUSTER_AFTER_S = 60.0
#: Forwarded lines kept off the console but written to the run's log (INFO: the run log's level, not the console's).
RAY_OUTPUT_LOGGER = "dyrep_ray.ray_output"


def ray_train_log_level() -> str:
    return os.environ.get(RAY_TRAIN_LOG_LEVEL_ENV, DEFAULT_RAY_TRAIN_LOG_LEVEL)


def _is_console_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


class WorkerConsole(TrainerCallback):
    """Sent to every worker: unless ``verbose``, its terminal output is warnings only (logs keep the rest)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def configure(self) -> None:
        """Called by the worker entry point before the trainer is built."""
        if self.verbose:
            return
        quiet_exit_in_finalizers()
        for name in ("", "ray.train"):  # the root logger and Ray Train's (which does not propagate)
            for handler in logging.getLogger(name).handlers:
                if _is_console_handler(handler):
                    handler.setLevel(logging.WARNING)


def quiet_exit_in_finalizers() -> None:
    """This process (a worker or a trial actor): a ``SystemExit`` raised inside a finalizer is logged at DEBUG.

    Ray ends a worker process with SIGTERM, and its handler raises ``SystemExit`` wherever the process is -- in a
    garbage-collected ``ActorHandle.__del__`` now and then, which Python prints as an "Exception ignored in"
    traceback.  Python drops that exception either way (the process ends when Ray kills it); only the traceback
    goes.  Every other exception in a finalizer still reaches the hook installed before (Python's: stderr).
    """
    previous = sys.unraisablehook
    if getattr(previous, "_dyrep_quiet_exit", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            logger.debug("SystemExit in a finalizer (%r): the process is ending", unraisable.object)
            return
        previous(unraisable)

    hook._dyrep_quiet_exit = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def quiet_ray_driver(trial_failures_to_log: bool = False) -> None:
    """Driver, before ``ray.init``: Ray's own INFO lines and harmless warnings off the terminal, and with
    ``trial_failures_to_log`` (the sweep console) Ray Tune's reports of a failed trial
    (:data:`~dyrep_ray.console.TRIAL_FAILURE_PATTERNS`); the run's log keeps them."""
    import ray  # noqa: F401 -- importing ray installs the handlers of its "ray" logger

    for handler in logging.getLogger("ray").handlers:
        if _is_console_handler(handler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not is_harmless(record.getMessage()))
            if trial_failures_to_log:
                handler.addFilter(lambda record: not is_trial_failure_report(record.getMessage()))


def log_forwarded(source: str, lines: list[str]) -> None:
    """Forwarded lines kept off the console, to the run's log (:data:`RAY_OUTPUT_LOGGER`), each after its source."""
    log = logging.getLogger(RAY_OUTPUT_LOGGER)
    for line in lines:
        log.info("%s %s", source, line)


class SlowClusterNotice:
    """Takes Ray's transient retry noise: every line to the run's log, and once it has gone on for ``after_s``
    seconds, one console warning (a cluster that is slow for a moment says nothing; one that stays slow, once)."""

    def __init__(self, after_s: float = SLOW_CLUSTER_AFTER_S, clock: Callable[[], float] = time.monotonic):
        self.after_s, self.clock = after_s, clock
        self.first: float | None = None
        self.records = 0
        self.warned = False

    def record(self, source: str, lines: list[str]) -> None:
        log_forwarded(source, lines)
        now = self.clock()
        self.first = now if self.first is None else self.first
        self.records += 1
        if not self.warned and now - self.first >= self.after_s:
            self.warned = True
            console.warning("the Ray cluster is slow to answer: Ray has retried or timed out %d time(s) in %.0f s "
                            "(resource requests, state queries); training goes on. Ray's lines are in the run's "
                            "log and Ray's session logs", self.records, now - self.first)


def filter_forwarded_output(notice: SlowClusterNotice | None = None, trial_failures_to_log: bool = False) -> None:
    """Driver, after ``ray.init``: drop forwarded worker/controller/trial lines known to be harmless or routine;
    Ray's transient retry noise goes to ``notice`` (the run's log; one console line if it persists).  With
    ``trial_failures_to_log`` (the sweep console, which says in one line that a trial failed and why), a trial
    worker's "Error in training function" record goes to the run's log only."""
    notice = notice or SlowClusterNotice()
    try:  # Ray has no public hook for forwarded worker output: wrap its printer (absent: nothing filtered)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        printer = dict(dispatcher.handlers).get(RAY_PRINTER)
    except (ImportError, AttributeError, TypeError, ValueError):
        printer = None
    if printer is None:
        logger.debug("Ray's worker-output printer not found; forwarded lines are not filtered")
        return

    continuations, failures = TracebackContinuations(), TracebackContinuations()
    held = HeldFinalizerRecords(lambda data: _print_kept(printer, data))

    def filtered(data: dict) -> None:
        name = str(data.get("actor_name") or data.get("task_name") or "")
        source = f"({name or 'ray'} pid={data.get('pid', '?')})"
        process = (name, data.get("pid"))
        continued, lines = continuations.split(process, held.release(process) + list(data.get("lines", [])))
        if continued:
            notice.record(source, continued)
        failed, lines = failures.split(process, lines)
        log_forwarded(source, failed)
        start = unfinished_finalizer_record(lines)
        if start is not None:  # decided when the rest of its traceback arrives (or shown after HOLD_S)
            held.hold(process, {**data, "lines": lines[start:]})
            lines = lines[:start]
        if not lines:
            return
        if is_transient_batch(name, lines):
            notice.record(source, lines)
            continuations.ended(process, True)
            return
        lines = drop_exit_in_finalizers(lines)
        kept, transient = split_transient(lines)
        if transient:
            notice.record(source, transient)
        continuations.ended(process, bool(transient) and lines[-1:] == transient[-1:])
        if trial_failures_to_log:
            shown, failed = split_records(kept, TRIAL_FAILURE_PATTERNS)
            log_forwarded(source, failed)
            failures.ended(process, bool(failed) and kept[-1:] == failed[-1:])
            kept = shown
        _print_kept(printer, {**data, "lines": kept})

    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(RAY_PRINTER, filtered)
    _filter_raylet_messages()


def _print_kept(printer: Callable[[dict], None], data: dict) -> None:
    kept = [line for line in data.get("lines", []) if not (is_harmless(line) or is_routine(line))]
    if kept:
        printer({**data, "lines": kept})


class HeldFinalizerRecords:
    """The start of a process's "Exception ignored in ...__del__" record whose traceback a later batch completes:
    held back until that batch comes (then filtered whole: a ``SystemExit`` one is dropped, any other error
    shown), or shown as it is after ``hold_s`` seconds if none does."""

    HOLD_S = 5.0

    def __init__(self, show: Callable[[dict], None], hold_s: float | None = None):
        self.show, self.hold_s = show, self.HOLD_S if hold_s is None else hold_s
        self._lock = threading.Lock()
        self._held: dict[object, tuple[dict, threading.Timer]] = {}

    def hold(self, process: object, data: dict) -> None:
        timer = threading.Timer(self.hold_s, self._expire, args=(process,))
        timer.daemon = True
        with self._lock:
            self._held[process] = (data, timer)
        timer.start()

    def release(self, process: object) -> list[str]:
        """The lines held for ``process`` (to go in front of its next batch), or none."""
        with self._lock:
            entry = self._held.pop(process, None)
        if entry is None:
            return []
        entry[1].cancel()
        return list(entry[0]["lines"])

    def _expire(self, process: object) -> None:
        with self._lock:
            entry = self._held.pop(process, None)
        if entry is not None:
            self.show(entry[0])


def _filter_raylet_messages() -> None:
    """The raylet's warnings reach the driver through ``print_to_stdstream`` directly, not the dispatcher."""
    try:
        from ray._private import worker as ray_worker

        print_to_stdstream = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        logger.debug("Ray's raylet-message printer not found; its lines are not filtered")
        return
    if getattr(print_to_stdstream, "_dyrep_filtered", False):
        return

    def filtered(data: dict, *args, **kwargs):
        lines = [line for line in data.get("lines", []) if not is_harmless(line)]
        if lines:
            return print_to_stdstream({**data, "lines": lines}, *args, **kwargs)
        return None

    filtered._dyrep_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


class EpochFollower:
    """Prints the console line of every new epoch of a run directory while a Ray run trains (driver thread)."""

    def __init__(self, storage: RunStorage, epochs: int, interval_s: float = FOLLOW_INTERVAL_S):
        self.storage, self.epochs, self.interval_s = storage, epochs, interval_s
        self.printed_through = max((int(r.get("epoch", 0)) for r in self._rows()), default=0)  # resume: done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dyrep-epoch-lines", daemon=True)

    def _rows(self) -> list[dict]:
        try:
            return parse_metrics(self.storage.read_text(METRICS_FILE) or "")[0]
        except Exception:  # noqa: BLE001 -- a half-written file is read again next time
            return []

    def poll(self) -> None:
        for row in sorted(self._rows(), key=lambda r: int(r.get("epoch", 0))):
            if int(row.get("epoch", 0)) > self.printed_through:
                console.info(epoch_line(row, self.epochs), extra={EPOCH_LINE: True})
                self.printed_through = int(row["epoch"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> EpochFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epochs, written just before fit returned
