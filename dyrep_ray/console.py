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
from pathlib import Path

from .engine.layout import CONFIG_FILE, TRAIN_LOG
from .engine.progress import CONSOLE_LOGGER, EPOCH_LINE

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
)

#: Forwarded lines that are routine progress, not news: Ray's per-report and per-checkpoint lines (of workers and
#: of Tune's trial actors) and INFO/DEBUG records in our or Ray's log format.  Shown only with ``--verbose``.
ROUTINE_PATTERNS = (
    re.compile(r"^Reporting training result \d+: "),
    re.compile(r"^Checkpoint successfully created at: "),
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO)\s"),
)


# Whole forwarded batches (a traceback) known to be harmless: (actor-name pattern, pattern of one of its lines).
# Train V2's placement-group cleaner asks the state API for "the" cluster; on a machine running several Ray
# instances (a driver-started local instance beside another one) that lookup raises, the cleaner logs the
# traceback and stops; the driver-started instance and its placement groups end with the driver anyway.
HARMLESS_BATCHES = (
    (re.compile(r"PlacementGroupCleaner"), re.compile(r"Found multiple active Ray instances")),
)


def is_harmless_batch(actor_name: str, lines: list[str]) -> bool:
    return any(actor.search(actor_name or "") and any(line.search(text) for text in lines)
               for actor, line in HARMLESS_BATCHES)


# A process Ray ends with SIGTERM while a finalizer runs (often an ``ActorHandle.__del__`` during garbage
# collection): Ray's SIGTERM handler raises ``SystemExit`` inside the finalizer and Python prints it as an
# "Exception ignored in" traceback.  It is the process ending as asked, not an error.
_FINALIZER_START = re.compile(r"^Exception ignored in: <function \S+\.__del__ at ")
_TRACEBACK_BODY = re.compile(r"^(Traceback \(most recent call last\):|\s)")
_SYSTEM_EXIT = re.compile(r"^SystemExit(: .*)?$")


def drop_exit_in_finalizers(lines: list[str]) -> list[str]:
    """``lines`` without the whole "Exception ignored in ...__del__" tracebacks that end in ``SystemExit``.

    A traceback not whole in ``lines`` (no ``SystemExit`` line after its body) and any other error stay.
    """
    kept, i = [], 0
    while i < len(lines):
        if _FINALIZER_START.match(lines[i]):
            end = i + 1
            while end < len(lines) and _TRACEBACK_BODY.match(lines[end]):
                end += 1
            if end < len(lines) and _SYSTEM_EXIT.match(lines[end]):
                i = end + 1
                continue
        kept.append(lines[i])
        i += 1
    return kept


def is_harmless(text: str) -> bool:
    return any(p.search(text) for p in HARMLESS_PATTERNS)


def is_routine(text: str) -> bool:
    return any(p.search(text) for p in ROUTINE_PATTERNS)


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
