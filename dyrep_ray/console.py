"""What ``dyrep-ray train`` shows on the terminal, and the run's ``train.log``.

By default: the header, one line per epoch, the summary (the ``dyrep_ray.console`` logger, to stdout) and every
warning or error (stderr); known harmless warnings are dropped.  ``--verbose``: every INFO record as well (and
Ray's own lines, see :mod:`dyrep_ray.distributed.console`).  ``--quiet``: no epoch lines and no progress bar.
Whatever the console hides still goes to ``<run_dir>/train.log`` (local run directories) and Ray's log files.

Torch-free and Ray-free at import (the CLI's fast paths import it).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .engine.progress import CONSOLE_LOGGER, EPOCH_LINE
from .rundir.layout import CONFIG_FILE, TRAIN_LOG

#: The one format of dyrep-ray log lines: console, run logs, Ray workers and Tune trial actors.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Warnings known to be harmless here, hidden from the console (kept in the logs): Ray's token-auth notice on
#: every local start, and the controller's PreemptionWatcher actor notice (its arguments live in the object
#: store; it is restarted only by Ray Train itself, which passes them again).
HARMLESS_PATTERNS = (
    re.compile(r"Token authentication is enabled for this Ray cluster"),
    re.compile(r"PreemptionWatcher.*max_restarts"),
    # Tune over Train starts a trial actor, a Train controller and workers per trial at once (and a local sweep
    # tells Ray it has more logical CPUs than cores): more Python workers than Ray's startup-concurrency hint.
    re.compile(r"PYTHON worker processes have been started on node.*maximum expected startup concurrency"),
    # Ray Train's own DatasetManager sets an ExecutionOptions field Ray Data deprecates (the warning and the
    # source line Python prints under it)
    re.compile(r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated"),
    re.compile(r"^\s+self\.exclude_resources = exclude_resources$"),
)

#: Forwarded lines that are routine progress, not news: Ray's per-report and per-checkpoint lines (of workers and
#: of Tune's trial actors) and INFO/DEBUG records in our or Ray's log format.  Shown only with ``--verbose``.
ROUTINE_PATTERNS = (
    re.compile(r"^Reporting training result \d+: "),
    re.compile(r"^Checkpoint successfully created at: "),
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO)\s"),
    # Ray Data, per dataset execution (every epoch of a Parquet run): start, plan, progress-bar note, end
    re.compile(r"^Starting execution of Dataset \S+\. Full logs are in "),
    re.compile(r"^Execution plan of Dataset \S+: "),
    re.compile(r"^Progress bars disabled\. To enable, set "),
    re.compile(r"^\W*Dataset \S+ execution finished in [\d.]+ seconds$"),
)


#: Ray retrying, or one of its safety nets failing, while the cluster is slow (a busy head, a congested network):
#: not the run's problem, so not the console's. Each pattern starts a record (with the traceback that follows it);
#: :mod:`dyrep_ray.distributed.console` writes these to the run's log and says once on the console if they persist.
TRANSIENT_PATTERNS = (
    # the Train controller's resource request to Ray's autoscaling coordinator timed out (GetTimeoutError)
    re.compile(r"Failed to (send|cancel) resource request for "),
    # Tune: a trial actor's setup took long (a busy machine) -- a hint to reuse actors, not an error
    re.compile(r"Trainable\.setup took [\d.]+ seconds.*reuse_actors"),
    re.compile(r"Consider boosting PBT performance by enabling `reuse_actors`"),
    # Train V2's state actor polls Ray's state API for dead controllers; a slow API logs this with a traceback and
    # the actor polls again (ray/train/v2/_internal/state/state_actor.py)
    re.compile(r"State API unavailable when checking if actor is alive\. Will check again on next poll"),
)

#: Ray's own reports of a failed trial, which the sweep console already gives in one line (the cause and the
#: trial's error file): a trial worker's "Error in training function" record with its traceback (forwarded
#: output), Ray Tune's "Trial task failed" record with its traceback and its "Trials did not complete" line (the
#: driver's ``ray`` logger).  Under the sweep console (not ``--verbose``) they go to ``tune.log`` only.
TRIAL_FAILURE_PATTERNS = (
    re.compile(r"^Error in training function:"),
    re.compile(r"Trial task failed for trial "),
    re.compile(r"Trials did not complete: "),
)

#: Actors whose tracebacks are transient as a whole: Train V2's PlacementGroupCleaner is a best-effort safety net
#: (it removes a run's placement group if the controller dies ungracefully) that polls Ray's state API; a slow
#: API (``requests`` timeouts) or several Ray instances on one machine ("Found multiple active Ray instances")
#: make it log a traceback or end its monitor thread. The run it watches is not affected.
TRANSIENT_ACTORS = re.compile(r"PlacementGroupCleaner")
_TRANSIENT_ACTOR_LINE = re.compile(r"Traceback \(most recent call last\)|Exception in thread |Failed to query ")


def is_transient_batch(actor_name: str, lines: list[str]) -> bool:
    """A forwarded batch of an actor in :data:`TRANSIENT_ACTORS` that holds a traceback or a failed query."""
    return bool(TRANSIENT_ACTORS.search(actor_name or "")) and any(_TRANSIENT_ACTOR_LINE.search(t) for t in lines)


# A process Ray ends with SIGTERM while a finalizer runs (often an ``ActorHandle.__del__`` during garbage
# collection): Ray's SIGTERM handler raises ``SystemExit`` inside the finalizer and Python prints it as an
# "Exception ignored in" traceback.  It is the process ending as asked, not an error.
_FINALIZER_START = re.compile(r"^Exception ignored in: <function \S+\.__del__ at ")
_TRACEBACK_BODY = re.compile(r"^(Traceback \(most recent call last\):|\s)")
_SYSTEM_EXIT = re.compile(r"^SystemExit(: .*)?$")
# the exception line that ends a traceback: a (dotted) exception class, Ray's "Cls(Cause)" form, and its message
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*|\w*(?:Error|Exception|Timeout|Exit|Interrupt))"
                             r"(?:\([\w.]+\))?(?::\s.*)?$")
_CHAINED = re.compile(r"^(|During handling of the above exception.*|The above exception was the direct cause.*)$")


def _continues_traceback(line: str) -> bool:
    """A line a traceback's later batch may hold: a frame, a chaining note, the exception line, or blank."""
    return bool(_TRACEBACK_BODY.match(line) or _CHAINED.match(line) or _EXCEPTION_LINE.match(line))


class TracebackContinuations:
    """Ray forwards a process's output in batches as it comes, so the traceback of a transient record (a
    :data:`TRANSIENT_PATTERNS` record, a :func:`is_transient_batch` batch) may end in the next batch.  Remembers the
    processes whose last batch ended inside one, and hands back the lines of their next batch that continue it."""

    def __init__(self) -> None:
        self._open: set[object] = set()  # processes (any hashable key) whose last batch ended in a transient record

    def split(self, process: object, lines: list[str]) -> tuple[list[str], list[str]]:
        """``(continuation, rest)``: the leading lines of ``lines`` that continue ``process``'s open traceback."""
        if process not in self._open:
            return [], lines
        n = 0
        while n < len(lines) and _continues_traceback(lines[n]):
            n += 1
        if n < len(lines):
            self._open.discard(process)
        return lines[:n], lines[n:]

    def ended(self, process: object, in_transient_record: bool) -> None:
        """Whether ``process``'s batch just seen ended inside a transient record."""
        if in_transient_record:
            self._open.add(process)
        else:
            self._open.discard(process)


def _body_end(lines: list[str], i: int) -> int:
    """The index after the traceback body (header and indented lines) that starts at ``lines[i]``."""
    while i < len(lines) and _TRACEBACK_BODY.match(lines[i]):
        i += 1
    return i


def record_end(lines: list[str], start: int) -> int:
    """The index after the log record at ``lines[start]``: the line, then any traceback that follows it (chained
    tracebacks included) up to and with its exception line."""
    end = _body_end(lines, start + 1)
    while end > start + 1 and end < len(lines) and _EXCEPTION_LINE.match(lines[end]):
        end += 1
        chained = end
        while chained < len(lines) and _CHAINED.match(lines[chained]):
            chained += 1
        if chained == end or chained >= len(lines) or not lines[chained].startswith("Traceback"):
            break
        end = _body_end(lines, chained)
    return end


def split_transient(lines: list[str]) -> tuple[list[str], list[str]]:
    """``lines`` as (kept, transient): the records of :data:`TRANSIENT_PATTERNS` (:func:`split_records`)."""
    return split_records(lines, TRANSIENT_PATTERNS)


def split_records(lines: list[str], patterns: Sequence[re.Pattern]) -> tuple[list[str], list[str]]:
    """``lines`` as (kept, matched): each record one of ``patterns`` starts, with its traceback (and the blank lines
    right after it), goes to the second list; every other line stays, in order."""
    kept: list[str] = []
    matched: list[str] = []
    i = 0
    while i < len(lines):
        if any(p.search(lines[i]) for p in patterns):
            end = record_end(lines, i)
            while end < len(lines) and not lines[end].strip():
                end += 1
            matched.extend(lines[i:end])
            i = end
        else:
            kept.append(lines[i])
            i += 1
    return kept, matched


def drop_exit_in_finalizers(lines: list[str]) -> list[str]:
    """``lines`` without the whole "Exception ignored in ...__del__" tracebacks that end in ``SystemExit``.

    A traceback not whole in ``lines`` (no ``SystemExit`` line after its body) and any other error stay.
    """
    kept, i = [], 0
    while i < len(lines):
        if _FINALIZER_START.match(lines[i]):
            end = _body_end(lines, i + 1)
            if end < len(lines) and _SYSTEM_EXIT.match(lines[end]):
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return kept


def unfinished_finalizer_record(lines: list[str]) -> int | None:
    """Where an "Exception ignored in ...__del__" record starts whose traceback runs to the end of ``lines`` with
    no exception line yet (Ray forwarded the rest of it in a later batch), or None."""
    i = 0
    while i < len(lines):
        if _FINALIZER_START.match(lines[i]):
            end = _body_end(lines, i + 1)
            if end == len(lines):
                return i
            i = end
        i += 1
    return None


def is_harmless(text: str) -> bool:
    return any(p.search(text) for p in HARMLESS_PATTERNS)


def is_routine(text: str) -> bool:
    return any(p.search(text) for p in ROUTINE_PATTERNS)


def is_trial_failure_report(text: str) -> bool:
    return any(p.search(text) for p in TRIAL_FAILURE_PATTERNS)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_harmless(record.getMessage())


class _ConsoleOnly(logging.Filter):
    """Passes the console logger's records (quiet: only its warnings and the summary/header)."""

    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != CONSOLE_LOGGER:
            return False
        return not (self.quiet and getattr(record, EPOCH_LINE, False))


class _NotConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != CONSOLE_LOGGER


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever ``sys.<name>`` is at emit time (test capture, a redirected stream)."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_console(verbose: bool = False, quiet: bool = False) -> None:
    """Route logging for a ``train`` run: console lines to stdout, warnings (or, verbose, everything) to stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if isinstance(h, _CurrentStream)]:  # an earlier main() in-process
        root.removeHandler(handler)
    configured = bool(root.handlers)  # an embedding program (or pytest) routes logging itself: as basicConfig
    lines = _CurrentStream("stdout")
    lines.setFormatter(logging.Formatter("dyrep-ray: %(message)s"))
    lines.addFilter(_ConsoleOnly(quiet))
    notices = _CurrentStream("stderr")
    notices.setFormatter(logging.Formatter(LOG_FORMAT))
    notices.addFilter(_NotConsole())
    if not verbose:
        notices.setLevel(logging.WARNING)
        notices.addFilter(_DropHarmless())
    root.addHandler(lines)
    if not configured:
        root.addHandler(notices)


class RunLog(logging.Handler):
    """``<run_dir>/train.log``: every INFO+ record of this process, appended (on resume too).

    Records are held in memory until the run directory holds its ``config.json`` (the run really started), so
    a command refused with a one-line error leaves nothing behind; from then on they are written as they come.
    """

    def __init__(self, run_dir: Path, marker: str = CONFIG_FILE, log_name: str = TRAIN_LOG):
        super().__init__(logging.INFO)
        self.run_dir, self.marker, self.log_name = run_dir, marker, log_name
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._pending: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def _open(self) -> bool:
        if self._file is None and (self.run_dir / self.marker).exists():
            self._file = logging.FileHandler(self.run_dir / self.log_name, encoding="utf-8")
            self._file.setFormatter(self.formatter)
            for record in self._pending:
                self._file.emit(record)
            self._pending.clear()
        return self._file is not None

    def emit(self, record: logging.LogRecord) -> None:
        if self._open():
            self._file.emit(record)
        else:
            self._pending.append(record)

    def close(self) -> None:
        self._open()  # the run wrote its files after the last record: keep what was held
        if self._file is not None:
            self._file.close()
        self._pending.clear()
        super().close()


def add_run_log(run_dir: str | Path, marker: str = CONFIG_FILE, log_name: str = TRAIN_LOG) -> logging.Handler | None:
    """Attach a :class:`RunLog` for ``run_dir`` (local run directories only; None for object storage).

    ``marker``/``log_name``: the file that proves the directory is ours, and the log's name (a sweep: sweep.json,
    tune.log).
    """
    if "://" in str(run_dir):
        return None
    handler = RunLog(Path(str(run_dir)), marker, log_name)
    logging.getLogger().addHandler(handler)
    logging.getLogger("ray").addHandler(handler)  # Ray's driver logger does not propagate to the root
    return handler
def remove_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("ray").removeHandler(handler)
        handler.close()
