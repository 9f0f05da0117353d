"""What ``dyrep-ray tune`` shows on the terminal: one line per trial result and a status table now and then.

Ray Tune's own console (boxed config and result tables per trial, a status table every 30 s) is replaced unless
``--verbose``: :class:`SweepConsole`, a Tune callback on the driver, prints through the ``dyrep_ray.console``
logger as ``dyrep-ray train`` does, and its :class:`StatusReporter` is Tune's progress reporter (Tune's public
``ProgressReporter`` interface, which Tune consults with ``RAY_AIR_NEW_OUTPUT=0``; the new output engine takes no
custom reporter and prints its boxes whatever the verbosity):

* ``trial <id> started: <searched values>`` when a trial (re)starts;
* ``trial <id> epoch 3/10  loss ...  top-1 ...  [grow ...]`` per result, marked as an epoch line (``--quiet``'s
  console filter hides those, as for ``dyrep-ray train``);
* ``trial <id> completed|stopped by <scheduler> ...`` and ``trial <id> failed ...`` (one line each);
* every ``status_interval_s`` seconds, when anything changed since the last one, Tune's status table: trials per
  state, elapsed time, the best trial so far, and one row per trial (searched values, epoch, last and best metric).

Whatever it hides stays in Ray's logs (``<ray session>/logs``), every trial's ``train.log``-equivalent files and
Tune's ``result.json`` under ``<sweep>/tune/``; the sweep's own ``tune.log`` gets every driver record.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray.tune import Callback, ProgressReporter

from ..engine.progress import EPOCH_LINE, console, epoch_line
from .results import error_line, finite_or_none
from .spec import SweepSpec

#: Seconds between two status tables by default: one per couple of minutes keeps a sweep of hour-long epochs
#: readable (Tune's own default of 30 s repeats the same table dozens of times per epoch).
DEFAULT_STATUS_INTERVAL_S = 120.0
#: Tune's trial states, in the order the status line lists them.
STATES = ("RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class SweepConsole(Callback):
    """The tune command's console (see the module docstring); ``status_interval_s=0`` prints no status tables.

    ``spec``: the sweep (``run_sweep`` sets it, also when resuming a sweep whose spec is read from its directory).
    """

    def __init__(self, spec: SweepSpec | None = None, status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
                 clock=time.monotonic):
        if status_interval_s < 0:
            raise ValueError(f"status_interval_s must be >= 0, got {status_interval_s}")
        self.spec, self.status_interval_s, self._clock = spec, status_interval_s, clock
        self._started = clock()
        self._last_status = self._started
        self._changed = False
        self._best: dict[str, tuple[float, int]] = {}  # trial id -> (best metric value, its epoch)
        self._donor: dict[str, str] = {}  # trial id -> last PBT origin printed (donor@epoch)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _epochs(self, trial) -> int:
        return int((trial.config or {}).get("epochs", self.spec.epochs))

    def _searched(self, trial) -> str:
        config = trial.config or {}
        return ", ".join(f"{key}={_value(config.get(key))}" for key in self.spec.search_space)

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.spec.mode == "max" else value < than

    def _record(self, trial, result: dict) -> None:
        value, epoch = finite_or_none(result.get(self.spec.metric)), int(result.get("epoch", 0) or 0)
        if value is None:
            return
        best = self._best.get(trial.trial_id)
        if best is None or self._better(value, best[0]):
            self._best[trial.trial_id] = (value, epoch)

    def _best_trial(self) -> tuple[str, float, int] | None:
        best = None
        for trial_id, (value, epoch) in self._best.items():
            if best is None or self._better(value, best[1]):
                best = (trial_id, value, epoch)
        return best

    # -- Tune callback hooks ---------------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self._started = self._last_status = self._clock()  # this fit's start (also after --resume)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True
        console.info("trial %s started: %s", trial.trial_id, self._searched(trial) or "(nothing searched)")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._changed = True
        self._record(trial, result)
        if "epoch" not in result:
            return
        donor = result.get("pbt_donor")
        exploit = ""
        origin = f"{donor}@{result.get('pbt_donor_epoch')}"  # a later exploit of the same donor is news too
        if donor and self._donor.get(trial.trial_id) != origin:
            self._donor[trial.trial_id] = origin
            exploit = f"  [PBT: continues {donor} epoch {result.get('pbt_donor_epoch')}; {self._searched(trial)}]"
        try:
            line = epoch_line(result, self._epochs(trial))
        except (KeyError, TypeError, ValueError):  # a result without the epoch keys (a restored last epoch)
            line = f"epoch {result.get('epoch')}/{self._epochs(trial)}  {self.spec.metric} " \
                   f"{_value(result.get(self.spec.metric))}"
        console.info("trial %s %s%s", trial.trial_id, line, exploit, extra={EPOCH_LINE: True})

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True
        last = trial.last_result or {}
        epoch, epochs = int(last.get("epoch", 0) or 0), self._epochs(trial)
        ended = "completed" if epoch >= epochs else f"stopped by {self.spec.scheduler_type} after epoch {epoch}"
        best = self._best.get(trial.trial_id)
        best_text = f"best {self.spec.metric} {best[0]:.4g} at epoch {best[1]}" if best else "no metric reported"
        console.info("trial %s %s (%d/%d epochs): %s", trial.trial_id, ended, epoch, epochs, best_text)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._changed = True
        text = ""
        error_file = getattr(trial, "error_file", None)
        if error_file:
            try:
                with open(error_file, encoding="utf-8", errors="replace") as f:
                    text = error_line(RuntimeError(f.read()))
            except OSError:
                text = ""
        epoch = int((trial.last_result or {}).get("epoch", 0) or 0)
        console.warning("trial %s failed after epoch %d: %s%s", trial.trial_id, epoch, text or "see its error file",
                        f" ({error_file})" if error_file else "")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.on_trial_error(iteration, trials, trial, **info)
        console.info("trial %s will be retried from its latest checkpoint", trial.trial_id)

    # -- the status table ------------------------------------------------------------------------------------
    def status_text(self, trials: list, now: float | None = None, *sys_args: str) -> str:
        now = self._clock() if now is None else now
        counts = Counter(str(trial.status) for trial in trials)
        ordered = [s for s in STATES if s in counts] + sorted(s for s in counts if s not in STATES)
        states = " | ".join(f"{counts[s]} {s}" for s in ordered)
        lines = [f"status after {_elapsed(now - self._started)}: {len(trials)} trial(s): {states}"]
        best = self._best_trial()
        if best:
            lines[0] += f"; best {best[0]} {self.spec.metric} {best[1]:.4g} at epoch {best[2]}"
        lines += [f"  {text}" for text in sys_args]  # Tune's "Logical resource usage: ..." line
        header = ["trial", "status", *self.spec.search_space, "epoch", self.spec.metric, f"best {self.spec.metric}"]
        rows = [header]
        for trial in trials:
            last = trial.last_result or {}
            best_of = self._best.get(trial.trial_id)
            config = trial.config or {}
            rows.append([trial.trial_id, str(trial.status), *(_value(config.get(k)) for k in self.spec.search_space),
                         _value(last.get("epoch")), _value(finite_or_none(last.get(self.spec.metric))),
                         _value(best_of[0] if best_of else None)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)

    def status_due(self, done: bool = False) -> bool:
        """A status table now?  Not at the end (the CLI prints the final table), nor twice for the same state."""
        return (not done and bool(self.status_interval_s) and self._changed
                and self._clock() - self._last_status >= self.status_interval_s)

    def reporter(self) -> StatusReporter:
        """Tune's progress reporter (``RunConfig(progress_reporter=...)``) that prints this console's table."""
        return StatusReporter(self)

    def print_status(self, trials: list, now: float | None = None, *sys_args: str) -> None:
        now = self._clock() if now is None else now
        console.info(self.status_text(trials, now, *sys_args))
        self._last_status, self._changed = now, False


class StatusReporter(ProgressReporter):
    """Tune's (legacy, public) progress-reporter interface: Tune asks it after every step whether to report and
    hands it the scheduler's and the resource usage lines; the table is :meth:`SweepConsole.status_text`."""

    def __init__(self, console: SweepConsole):
        self.console = console

    def should_report(self, trials: list, done: bool = False) -> bool:
        return self.console.status_due(done)

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        usage = [text for text in sys_info if text.startswith("Logical resource usage")]
        self.console.print_status(trials, None, *usage)
