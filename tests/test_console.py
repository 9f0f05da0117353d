"""The console of ``dyrep-ray train``: the default command on real Ray (2 workers), and ``--local``.

Default: header, one line per epoch, the summary; none of Ray's per-report/per-checkpoint lines, none of the
known harmless warnings.  ``--verbose``: Ray's lines are back.  Everything lands in ``<run_dir>/train.log``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dyrep_ray.console import (
    HARMLESS_PATTERNS,
    drop_exit_in_finalizers,
    is_harmless,
    is_routine,
    is_transient_batch,
    record_end,
    split_transient,
)
from dyrep_ray.engine.progress import epoch_line
from dyrep_ray.rundir.layout import TRAIN_LOG
from tests.shared_runs import user_env

EPOCHS = 2
DEFAULT_COMMAND = ["train", "--set", f"epochs={EPOCHS}", "--set", "synthetic_train_size=256",
                   "--set", "synthetic_val_size=128"]
RAY_ROUTINE = ("Reporting training result", "Checkpoint successfully created")
#: Header + one line per epoch + summary, plus room for a real warning or two on a loaded machine.
MAX_DEFAULT_LINES = EPOCHS + 2 + 3
RUN_TIMEOUT_S = 480
EPOCH_LINE = re.compile(r"^dyrep-ray: epoch (\d+)/(\d+)  loss ")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dyrep_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=user_env())


def non_empty(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def check_default_console(done: subprocess.CompletedProcess, epochs: int) -> Path:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = non_empty(done.stdout) + non_empty(done.stderr)
    assert not [line for line in lines if any(r in line for r in RAY_ROUTINE)], lines
    assert not [line for line in lines if is_harmless(line)], lines
    epoch_numbers = [int(m.group(1)) for line in lines if (m := EPOCH_LINE.match(line))]
    assert epoch_numbers == list(range(1, epochs + 1)), lines  # exactly one line per epoch, in order
    header = [line for line in lines if line.startswith("dyrep-ray: train ") and "run dir" in line]
    assert len(header) == 1 and "model small_cnn" in header[0] and "synthetic" in header[0], lines
    summary = [line for line in lines if "best top-1" in line]
    assert len(summary) == 1, lines
    assert len(lines) <= MAX_DEFAULT_LINES, lines
    run_dir = Path(summary[0].rsplit("(run dir: ", 1)[1].rstrip(")"))
    log = (run_dir / TRAIN_LOG).read_text()
    assert "best top-1" in log and "epoch 1/" in log  # what the console shows is in the run's log too
    return run_dir


@pytest.mark.ray
def test_default_command_console_on_ray(tmp_path):
    done = run_cli(DEFAULT_COMMAND, tmp_path)
    run_dir = check_default_console(done, EPOCHS)
    assert "launching 2 CPU worker(s)" in (run_dir / TRAIN_LOG).read_text()  # hidden INFO, kept in the log


@pytest.mark.ray
def test_verbose_shows_rays_lines(driver_killed_rerun):
    # on the shared Ray instance (--address): the worker lines reach this driver as they would a local start's.
    # The run is the session's `dyrep-ray train --verbose` that resumes a killed driver's run (its last epoch).
    done = driver_killed_rerun.rerun
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert all(r in out for r in RAY_ROUTINE), out[-3000:]


def test_local_console_and_quiet(tmp_path):
    local = [*DEFAULT_COMMAND, "--local", "--set", "batch_size=64", "--set", "dyrep_recal_bn_iters=2"]
    check_default_console(run_cli(local, tmp_path), EPOCHS)
    quiet = run_cli([*local, "--quiet", "--name", "quiet"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    lines = non_empty(quiet.stdout) + non_empty(quiet.stderr)
    assert not any(EPOCH_LINE.match(line) for line in lines) and any("best top-1" in line for line in lines), lines


def test_epoch_line_and_harmless_patterns():
    row = {"epoch": 3, "train_loss": 1.23456, "val_top1": 45.678, "lr": 0.01, "params": 12345, "n_blocks": 2,
           "images_per_s": 512.4, "epoch_time_s": 2.25, "events": [{"op": "grow", "path": "features.0"}]}
    assert epoch_line(row, 6) == ("epoch 3/6  loss 1.2346  top-1 45.68%  lr 0.01000  params 12,345  blocks 2  "
                                  "512 img/s  2.2s  [grow features.0]")
    preemption = ("[2026-12-01 22:25:58,656 E 29496 29526] core_worker.cc:2465: Actor with class name: "
                  "'PreemptionWatcher' and ID: 'bb' has constructor arguments in the object store and "
                  "max_restarts > 0. If the arguments ...")
    assert is_harmless(preemption) and len(HARMLESS_PATTERNS) >= 2
    assert not is_harmless("DyRep: cut skipped: non-finite metric")
    logging.getLogger(__name__).debug("patterns checked")


def test_placement_group_cleaner_tracebacks_are_transient_and_nothing_else_of_it():
    traceback_lines = ["Traceback (most recent call last):", '  File "placement_group_cleaner.py", line 80',
                       "ConnectionError: Found multiple active Ray instances: {'a', 'b'}."]
    assert is_transient_batch("PlacementGroupCleaner", traceback_lines)
    thread_died = ["Exception in thread PlacementGroupCleanerMonitor:", *traceback_lines[:2],
                   "requests.exceptions.ReadTimeout: HTTPConnectionPool(host='127.0.0.1', port=8265): Read timed out."]
    assert is_transient_batch("PlacementGroupCleaner", thread_died)
    # the same error from any other actor (e.g. a training worker) is shown
    assert not is_transient_batch("RayTrainWorker", traceback_lines)
    # and the cleaner's other output is shown
    assert not is_transient_batch("PlacementGroupCleaner", ["Detected that the Ray Train controller actor is dead."])


def ray_formatted_warning_with_traceback(message: str) -> list[str]:
    """What a Ray actor prints for ``logger.warning(message, exc_info=True)`` after a real ``ray.get`` timeout:
    Ray's own log format, a real chained traceback."""
    import ray.exceptions
    from ray._private.ray_constants import LOGGER_FORMAT

    def get_with_timeout():
        try:
            raise TimeoutError("the object was not ready")
        except TimeoutError as exc:
            raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.") from exc

    try:
        get_with_timeout()
    except ray.exceptions.GetTimeoutError:
        record = logging.LogRecord("ray.train", logging.WARNING, "autoscaling_coordinator_client.py", 76, message,
                                   None, sys.exc_info())
    return logging.Formatter(LOGGER_FORMAT).format(record).splitlines()


# What the Train controller printed (its .err file) while its workers were starved of CPU: a real record.
RESOURCE_REQUEST_TIMEOUT = [
    ("Failed to send resource request for train-d77e21afb78745e6bc8768ada567677b. If this only happens "
     "transiently during network partition or CPU being overloaded, it's safe to ignore this error. If this error "
     "persists, file a GitHub issue."),
    'Traceback (most recent call last):',
    ('  File "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/scaling_policy/'
     'autoscaling_coordinator_client.py", line 58, in send_resource_request'),
    '    ray.get(',
    '  File "/venv/lib/python3.11/site-packages/ray/_private/auto_init_hook.py", line 22, in auto_init_wrapper',
    '    return fn(*args, **kwargs)',
    '           ^^^^^^^^^^^^^^^^^^^',
    '  File "/venv/lib/python3.11/site-packages/ray/_private/client_mode_hook.py", line 134, in wrapper',
    '    return func(*args, **kwargs)',
    '           ^^^^^^^^^^^^^^^^^^^^^',
    '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 3009, in get',
    '    values, debugger_breakpoint = worker.get_objects(',
    '                                  ^^^^^^^^^^^^^^^^^^^',
    '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1007, in get_objects',
    '    ] = self.core_worker.get_objects(',
    '        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^',
    '  File "python/ray/_raylet.pyx", line 3471, in ray._raylet.CoreWorker.get_objects',
    '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    'ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.',
]


def test_a_resource_request_timeout_is_transient_with_its_whole_traceback():
    warning = ray_formatted_warning_with_traceback(
        "Failed to send resource request for train-abc. If this only happens transiently during network partition "
        "or CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.")
    assert warning[-1].startswith("ray.exceptions.GetTimeoutError") and len(warning) > 8  # a chained traceback
    assert record_end(warning, 0) == len(warning)
    kept, transient = split_transient(["epoch 1 starts", *warning, "Traceback (most recent call last):",
                                       "  File 'loop.py'", "ValueError: a real error"])
    assert transient == warning
    assert kept == ["epoch 1 starts", "Traceback (most recent call last):", "  File 'loop.py'",
                    "ValueError: a real error"]
    setup_hint = ("2026-12-07 02:10:00,123\tINFO trainable.py:155 -- Trainable.setup took 10.712 seconds. If your "
                  "trainable is slow to initialize, consider setting reuse_actors=True to reduce actor creation "
                  "overheads.")
    assert split_transient([setup_hint, "trial result"]) == (["trial result"], [setup_hint])
    # the same words inside a real error message are not Ray's retry: a line that merely mentions them stays
    assert split_transient(["ValueError: my resource request failed"])[1] == []
    assert split_transient([*RESOURCE_REQUEST_TIMEOUT, *RESOURCE_REQUEST_TIMEOUT, "next"]) == (
        ["next"], RESOURCE_REQUEST_TIMEOUT * 2)


def test_a_state_api_timeout_of_trains_state_actor_is_transient_with_its_traceback():
    from ray.util.state.exception import RayStateApiException

    try:
        raise RayStateApiException("Failed to make request to /api/v0/actors: timed out")
    except RayStateApiException:
        record = logging.LogRecord("ray.train", logging.ERROR, "state_actor.py", 108,
                                   "State API unavailable when checking if actor is alive. Will check again on next "
                                   "poll.", None, sys.exc_info())
    from ray._private.ray_constants import LOGGER_FORMAT

    lines = logging.Formatter(LOGGER_FORMAT).format(record).splitlines()
    assert lines[-1].startswith("ray.util.state.exception.RayStateApiException") and len(lines) > 3
    assert split_transient(["epoch 1", *lines, "epoch 2"]) == (["epoch 1", "epoch 2"], lines)


def test_slow_cluster_notice_logs_every_line_and_warns_once_only_when_it_persists(console_records):
    from dyrep_ray.distributed.console import RAY_OUTPUT_LOGGER, SlowClusterNotice
    from tests.conftest import RecordList

    clock = [100.0]
    notice = SlowClusterNotice(after_s=60, clock=lambda: clock[0])
    run_log, ray_output = RecordList(), logging.getLogger(RAY_OUTPUT_LOGGER)
    ray_output.addHandler(run_log)
    ray_output.setLevel(logging.INFO)  # what the CLI's console set-up gives every logger (root at INFO)
    try:
        notice.record("(TrainController pid=1)", ["Failed to send resource request for x.", "Traceback ..."])
        clock[0] += 59
        notice.record("(TrainController pid=1)", ["Failed to send resource request for x."])
        assert console_records.messages() == []  # slow for under a minute: nothing on the console
        clock[0] += 2
        notice.record("(PlacementGroupCleaner pid=2)", ["Exception in thread PlacementGroupCleanerMonitor:"])
        clock[0] += 100
        notice.record("(TrainController pid=1)", ["Failed to send resource request for x."])
    finally:
        ray_output.removeHandler(run_log)
        ray_output.setLevel(logging.NOTSET)
    assert len(run_log.messages()) == 5 and run_log.messages()[0].startswith("(TrainController pid=1) Failed")
    warnings = console_records.messages(logging.WARNING)
    assert len(warnings) == 1 and "slow to answer" in warnings[0] and "3 time(s) in 61 s" in warnings[0]


@contextlib.contextmanager
def filter_on_rays_dispatcher(notice, **options):
    """Ray's own dispatcher of forwarded worker output, with the driver's filter (reporting to ``notice``, with
    ``options``) installed over a printer that records the batches it is given: yields ``(dispatcher, printed)``;
    Ray's printer is put back afterwards."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from dyrep_ray.distributed import console as ray_console

    printed: list[dict] = []
    previous = dict(dispatcher.handlers).get(ray_console.RAY_PRINTER)
    if previous is not None:
        dispatcher.remove_handler(ray_console.RAY_PRINTER)
    dispatcher.add_handler(ray_console.RAY_PRINTER, printed.append)
    try:
        ray_console.filter_forwarded_output(notice, **options)
        yield dispatcher, printed
    finally:
        dispatcher.remove_handler(ray_console.RAY_PRINTER)
        if previous is not None:
            dispatcher.add_handler(ray_console.RAY_PRINTER, previous)


def test_forwarded_output_filter_on_rays_dispatcher(console_records):
    """Ray's own dispatcher of forwarded worker output, with the driver's filter installed over its printer."""
    from dyrep_ray.distributed import console as ray_console

    notice = ray_console.SlowClusterNotice(after_s=0)
    with filter_on_rays_dispatcher(notice) as (dispatcher, printed):
        warning = ray_formatted_warning_with_traceback("Failed to send resource request for train-abc.")
        dispatcher.emit({"actor_name": "TrainController", "pid": 7, "lines": [*warning, "a real line"]})
        dispatcher.emit({"actor_name": "PlacementGroupCleaner", "pid": 8,
                         "lines": ["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent "
                                   "call last):", "  File 'x.py'", "requests.exceptions.ReadTimeout: timed out"]})
        dispatcher.emit({"actor_name": "RayTrainWorker", "pid": 9, "lines": ["Reporting training result 1: {}"]})
    assert [batch["lines"] for batch in printed] == [["a real line"]]
    assert notice.records == 2
    assert len(console_records.messages(logging.WARNING)) == 1


# A PlacementGroupCleaner's monitor thread dying beside another Ray instance, as a test run's console got it: Ray's
# log monitor forwarded the traceback in two batches (it reads the actor's output file as lines arrive).
CLEANER_THREAD_DIED = [
    ["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
     '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 1045, in _bootstrap_inner'],
    ["    self.run()",
     '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 982, in run',
     "    self._target(*self._args, **self._kwargs)",
     '  File "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/controller/'
     'placement_group_cleaner.py", line 80, in _monitor_loop',
     "    alive = is_actor_alive(",
     "            ^^^^^^^^^^^^^^^",
     '  File "/venv/lib/python3.11/site-packages/ray/_private/services.py", line 533, in '
     'canonicalize_bootstrap_address_or_die',
     "    raise ConnectionError(",
     "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:63991', '192.0.2.2:50421'}. Please specify "
     "the one to connect to by setting the `--address` flag or `RAY_ADDRESS` environment variable."],
]


def test_a_transient_traceback_forwarded_in_several_batches_stays_off_the_console(console_records):
    """The batches that continue a transient record's traceback are transient too; the same process's next message,
    and another process's lines, are not."""
    from dyrep_ray.distributed import console as ray_console

    notice = ray_console.SlowClusterNotice(after_s=3600)
    cleaner, controller = {"actor_name": "PlacementGroupCleaner", "pid": 8}, {"actor_name": "TrainController", "pid": 7}
    warning = ray_formatted_warning_with_traceback("Failed to send resource request for train-abc.")
    with filter_on_rays_dispatcher(notice) as (dispatcher, printed):
        for batch in CLEANER_THREAD_DIED:
            dispatcher.emit({**cleaner, "lines": batch})
        dispatcher.emit({**cleaner, "lines": ["Detected that the Ray Train controller actor is dead."]})
        dispatcher.emit({**cleaner, "lines": ["    an indented line after the cleaner's own message"]})
        dispatcher.emit({**controller, "lines": warning[:3]})
        dispatcher.emit({**controller, "lines": [*warning[3:], "a real line"]})
        dispatcher.emit({"actor_name": "RayTrainWorker", "pid": 9, "lines": CLEANER_THREAD_DIED[1]})
    assert [batch["lines"] for batch in printed] == [
        ["Detected that the Ray Train controller actor is dead."],
        ["    an indented line after the cleaner's own message"],
        ["a real line"],
        CLEANER_THREAD_DIED[1],  # a worker's traceback is the run's problem: shown
    ]
    assert len(warning) > 3 and notice.records == 4


# A Tune trial's worker raising (what the errored sweep's worker forwarded), in two batches
WORKER_ERROR = [["fault injection: raise at epoch 0 on rank 0", "Error in training function:",
                 "Traceback (most recent call last):",
                 '  File "/work/main/dyrep_ray/tune/worker.py", line 13, in segment_loop'],
                ["    train_loop_per_worker(loop_config)",
                 "dyrep_ray.engine.faults.InjectedFault: injected fault at epoch 0 on rank 0", ""]]


@pytest.mark.parametrize("sweep_console", [True, False])
def test_a_trial_workers_error_record_goes_to_the_run_log_under_the_sweep_console(console_records, sweep_console):
    """The sweep console says in one line that a trial failed and why: the worker's "Error in training function"
    record (traceback split over two batches, and the blank line after it) goes to the run's log instead.
    Without the sweep console (``dyrep-ray train``) a worker's error is shown whole."""
    from dyrep_ray.distributed import console as ray_console
    from tests.conftest import RecordList

    run_log, ray_output = RecordList(), logging.getLogger(ray_console.RAY_OUTPUT_LOGGER)
    ray_output.addHandler(run_log)
    ray_output.setLevel(logging.INFO)
    worker = {"actor_name": "RayTrainWorker", "pid": 9}
    try:
        with filter_on_rays_dispatcher(ray_console.SlowClusterNotice(after_s=3600),
                                       trial_failures_to_log=sweep_console) as (dispatcher, printed):
            for batch in WORKER_ERROR:
                dispatcher.emit({**worker, "lines": batch})
            dispatcher.emit({**worker, "lines": ["the worker's next message"]})
    finally:
        ray_output.removeHandler(run_log)
        ray_output.setLevel(logging.NOTSET)
    shown = [line for batch in printed for line in batch["lines"]]
    if sweep_console:
        assert shown == [WORKER_ERROR[0][0], "the worker's next message"]
        assert run_log.messages() == [f"(RayTrainWorker pid=9) {line}" for line in [*WORKER_ERROR[0][1:],
                                                                                    *WORKER_ERROR[1]]]
    else:
        assert shown == [*WORKER_ERROR[0], *WORKER_ERROR[1], "the worker's next message"]
        assert run_log.messages() == []


def test_tunes_report_of_a_failed_trial_leaves_the_console_of_a_sweep_only():
    """Ray Tune's "Trial task failed" and "Trials did not complete" records (the driver's ``ray`` logger) are off
    the console under the sweep console, which reports the failure itself; any other Ray error stays."""
    import ray  # noqa: F401 -- installs the "ray" logger's console handler

    from dyrep_ray.distributed.console import _is_console_handler, quiet_ray_driver

    handlers = [h for h in logging.getLogger("ray").handlers if _is_console_handler(h)]
    saved = [(h, h.level, list(h.filters)) for h in handlers]

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, __file__, 1, message, None, None)

    try:
        quiet_ray_driver()
        assert handlers and all(h.filter(record("Trial task failed for trial a_00000")) for h in handlers)
        quiet_ray_driver(trial_failures_to_log=True)
        for h in handlers:
            assert not h.filter(record("Trial task failed for trial a_00000"))
            assert not h.filter(record("Trials did not complete: [a_00000]"))
            assert h.filter(record("Failed to restore the tuner: something else"))
    finally:
        for h, level, filters in saved:
            h.setLevel(level)
            h.filters[:] = filters


# What a trial actor printed in CI when Ray's SIGTERM arrived during a garbage-collected ActorHandle.__del__.
EXIT_IN_FINALIZER = ["Exception ignored in: <function ActorHandle.__del__ at 0x7f780bde2480>",
                     "Traceback (most recent call last):",
                     '  File "/site-packages/ray/actor.py", line 2143, in __del__',
                     "    worker.core_worker.remove_actor_handle_reference(self._ray_actor_id)",
                     '  File "/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
                     '  File "python/ray/_raylet.pyx", line 712, in raise_sys_exit_with_custom_error_message',
                     "SystemExit: 1"]


def test_a_finalizer_record_forwarded_in_two_batches_is_judged_whole(console_records, monkeypatch):
    """Ray forwarded a SystemExit-in-finalizer record split after its first line: the start is held until the rest
    comes, then dropped whole; a finalizer's real error split the same way is shown whole; a start whose rest never
    comes is shown after the hold."""
    import time

    from dyrep_ray.distributed import console as ray_console

    monkeypatch.setattr(ray_console.HeldFinalizerRecords, "HOLD_S", 0.3)
    real_error = [*EXIT_IN_FINALIZER[:-1], "ValueError: the handle is broken"]
    with filter_on_rays_dispatcher(ray_console.SlowClusterNotice(after_s=3600)) as (dispatcher, printed):
        dispatcher.emit({"actor_name": "Plain", "pid": 1, "lines": ["collected", EXIT_IN_FINALIZER[0]]})
        dispatcher.emit({"actor_name": "Plain", "pid": 1, "lines": [*EXIT_IN_FINALIZER[1:], "after"]})
        dispatcher.emit({"actor_name": "Broken", "pid": 2, "lines": real_error[:3]})
        dispatcher.emit({"actor_name": "Broken", "pid": 2, "lines": real_error[3:]})
        dispatcher.emit({"actor_name": "Cut", "pid": 3, "lines": EXIT_IN_FINALIZER[:2]})
        assert [batch["lines"] for batch in printed] == [["collected"], ["after"], real_error]
        deadline = time.monotonic() + 30
        while len(printed) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [batch["lines"] for batch in printed[3:]] == [EXIT_IN_FINALIZER[:2]]
    assert printed[3]["actor_name"] == "Cut"


def test_exit_in_a_finalizer_is_dropped_whole_and_nothing_else():
    assert drop_exit_in_finalizers(["before", *EXIT_IN_FINALIZER, "after"]) == ["before", "after"]
    # a finalizer's real error, and a traceback cut off before its SystemExit line, are shown
    real = [*EXIT_IN_FINALIZER[:-1], "ValueError: the handle is broken"]
    assert drop_exit_in_finalizers(real) == real
    assert drop_exit_in_finalizers(EXIT_IN_FINALIZER[:-1]) == EXIT_IN_FINALIZER[:-1]
    # an ordinary traceback ending in SystemExit (not in a finalizer) is shown
    assert drop_exit_in_finalizers(EXIT_IN_FINALIZER[1:]) == EXIT_IN_FINALIZER[1:]


def test_quiet_exit_in_finalizers_passes_every_other_finalizer_error_on(monkeypatch):
    from dyrep_ray.distributed.console import quiet_exit_in_finalizers

    seen: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(type(unraisable.exc_value)))
    quiet_exit_in_finalizers()
    quiet_exit_in_finalizers()  # idempotent: one wrapper, not two

    class ExitsWhenCollected:
        def __del__(self):
            raise SystemExit(1)

    class FailsWhenCollected:
        def __del__(self):
            raise ValueError("broken")

    ExitsWhenCollected()
    FailsWhenCollected()
    assert seen == [ValueError]


SIGTERM_IN_FINALIZER_DRIVER = """
import os, signal, sys, time
import ray

class SigtermInFinalizer:  # Ray's SIGTERM arriving while a finalizer runs, made certain
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at a bytecode boundary still inside __del__
            time.sleep(0.001)

def collect(quiet):
    if quiet:
        from dyrep_ray.distributed.console import quiet_exit_in_finalizers
        quiet_exit_in_finalizers()
    SigtermInFinalizer()
    print("collected", flush=True)

@ray.remote(num_cpus=0)
class Plain:
    def run(self):
        collect(False)

@ray.remote(num_cpus=0)
class Quiet:
    def run(self):
        collect(True)

ray.init(address="local", num_cpus=1, log_to_driver=True, include_dashboard=False)
if sys.argv[1] == "filtered":
    from dyrep_ray.distributed.console import filter_forwarded_output
    filter_forwarded_output()
actors = [Plain.remote(), Quiet.remote()]
ray.get([a.run.remote() for a in actors])
time.sleep(3)  # Ray forwards actor output about every second
"""


@pytest.mark.ray
@pytest.mark.parametrize("driver", ["unfiltered", "filtered"])
def test_sigterm_in_a_finalizer_prints_no_traceback(tmp_path, driver):
    """The CI flake of stop 19: a trial actor's ``Exception ignored in: ActorHandle.__del__ ... SystemExit`` when
    Ray ended it.  Reproduced for certain on real Ray actors: without a fix the traceback reaches the driver; the
    actor's own hook (``quiet_exit_in_finalizers``) and the driver's filter each keep it off the console."""
    script = tmp_path / "driver.py"
    script.write_text(SIGTERM_IN_FINALIZER_DRIVER)
    done = subprocess.run([sys.executable, str(script), driver], cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=user_env())
    assert done.returncode == 0, done.stderr[-3000:]
    lines = non_empty(done.stdout) + non_empty(done.stderr)
    for actor in ("Plain", "Quiet"):  # both actors ran, and Ray forwarded their output
        assert any(f"({actor} pid=" in line and "collected" in line for line in lines), lines
    tracebacks = {actor for actor in ("Plain", "Quiet") for line in lines
                  if f"({actor} pid=" in line and "Exception ignored in" in line}
    assert tracebacks == ({"Plain"} if driver == "unfiltered" else set()), lines


def test_routine_patterns():
    assert is_routine("Reporting training result 3: TrainingReport(checkpoint=None, metrics={'epoch': 3})")
    assert is_routine("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x/checkpoint_000000)")
    assert is_routine("2026-12-02 00:57:46,838 INFO dyrep_ray.tune.trainable: trial a: segment 0 in /x")
    assert is_routine("2026-12-02 00:58:25,127\tINFO tune.py:1007 -- Wrote the latest version of all result files")
    assert not is_routine("2026-12-02 00:58:25,127 WARNING dyrep_ray.engine.loop: cut skipped")
    assert not is_routine("Traceback (most recent call last):")


def test_ray_data_lines_of_a_parquet_run_are_routine_or_harmless():
    """The lines Ray Data and Ray Train's DatasetManager forward from a Parquet run's workers, each epoch (seen on
    the console of `dyrep-ray train --set dataset=parquet ...`): routine, or a harmless deprecation of Ray's own."""
    ray_data = [
        "Starting execution of Dataset dataset_035AVdz5pf7avEMQpOmzKM_0. Full logs are in /tmp/ray/s/logs/ray-data",
        "Execution plan of Dataset val_035AVeHom42FQRgaMF9szN_0: InputDataBuffer[Input] -> "
        "TaskPoolMapOperator[ListFiles] -> TaskPoolMapOperator[ReadFilesParquetV2]",
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "\u2714\ufe0f  Dataset val_035AVeHom42FQRgaMF9szN_0 execution finished in 9.97 seconds",
    ]
    assert all(is_routine(line) for line in ray_data), [line for line in ray_data if not is_routine(line)]
    assert is_harmless("/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
                       "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2026.")
    assert is_harmless("  self.exclude_resources = exclude_resources")
    assert not is_routine("Execution of Dataset x failed") and not is_harmless("  self.other = 1")
    assert is_harmless("WARNING: 8 PYTHON worker processes have been started on node: ab with address: 1.2.3.4, "
                       "which is 4x the maximum expected startup concurrency (2). This could be")


TUNE_RESULT_LINE = re.compile(r"^dyrep-ray: trial (\w+) epoch (\d+)/(\d+)  loss ")
#: The warning of the fault the errored sweep injects (dyrep_ray.engine.faults), which its worker prints.
INJECTED_FAULT_WARNING = "fault injection: raise at epoch 0 on rank 0"


@pytest.mark.ray
def test_tune_console(errored_sweep):
    """``dyrep-ray tune`` on the demo sweep (the session's ``errored_sweep``: one trial's worker raises in its first
    epoch, then ``dyrep-ray tune --resume`` re-runs that trial): a header, a start line per trial, one line per
    trial result, an end line per trial (the failure's is one line naming the cause), status tables at the
    interval, the final table -- and none of Tune's boxes, Ray's routine lines, the known harmless warnings or
    Ray's own tracebacks of the failure, from either command; ``tune.log`` keeps what the console hides."""
    epochs, first, resumed = 2, errored_sweep.first, errored_sweep.resumed
    results: dict[str, list[int]] = {}
    for done in (first, resumed):
        assert done.returncode == 0, done.stderr[-3000:]
        lines = non_empty(done.stdout) + non_empty(done.stderr)
        assert not [line for line in lines if any(r in line for r in RAY_ROUTINE)], lines
        assert not [line for line in lines if is_harmless(line) or is_routine(line)], lines
        shown = [line for line in lines if not line.endswith(INJECTED_FAULT_WARNING)]  # the test's own fault
        assert not [line for line in shown if "╭" in line or "Trial status:" in line or "(RayTrainWorker" in line
                    or "(TrainController" in line or "(DyRepTrial" in line or "Traceback" in line], lines
        for line in lines:
            if m := TUNE_RESULT_LINE.match(line):
                results.setdefault(m.group(1), []).append(int(m.group(2)))
                assert int(m.group(3)) == epochs
        assert any(line.startswith("dyrep-ray: status after ") for line in lines), lines
        final = [i for i, line in enumerate(lines) if line.startswith("dyrep-ray tune: sweep demo: 2 trial(s)")]
        assert len(final) == 1 and lines[final[0] + 1].split()[:2] == ["trial_id", "status"], lines
    first_lines, resumed_lines = non_empty(first.stdout), non_empty(resumed.stdout)
    header = [line for line in first_lines if line.startswith("dyrep-ray: tune demo: 2 trial(s) of small_cnn")]
    assert len(header) == 1 and "metric val_top1 (max)" in header[0], first_lines
    assert [line for line in resumed_lines if line.startswith("dyrep-ray: tune demo: resuming ")], resumed_lines
    assert len(results) == 2 and all(seen == list(range(1, epochs + 1)) for seen in results.values()), results
    failed = [line for line in first_lines if re.match(r"^dyrep-ray: trial \w+ failed after epoch 0: ", line)]
    assert len(failed) == 1 and "InjectedFault: injected fault" in failed[0], first_lines
    errored = failed[0].split()[2]
    for trial in results:
        run = resumed_lines if trial == errored else first_lines  # where the trial ran to its end
        assert sum(line.startswith(f"dyrep-ray: trial {trial} started: ") for line in run) == 1, run
        ends = [line for line in run if line.startswith(f"dyrep-ray: trial {trial} ") and "best val_top1" in line]
        assert len(ends) == 1 and (" completed " in ends[0] or " stopped by asha " in ends[0]), run
    # the first command's log: what its console showed and what it hid (Ray's start, the failure's tracebacks)
    log = (errored_sweep.after_first / "tune.log").read_text()
    assert "Started a local Ray instance" in log and "tune demo: 2 trial(s)" in log
    assert "Error in training function:" in log and f"Trial task failed for trial {errored}" in log
    assert "InjectedFault: injected fault" in log.split(f"Trial task failed for trial {errored}")[1]
    check_demo_sweep_results(errored_sweep.sweep, results)


def check_demo_sweep_results(sweep: Path, reported: dict[str, list[int]]) -> None:
    """What the demo sweep leaves: a run directory per trial (as ``dyrep-ray train``'s) whose epochs are the ones
    the console reported, its searched lr in effect, the tables, the best config and the plot."""
    import json

    import pandas as pd

    from dyrep_ray.engine.checkpoint import load_checkpoint_dir
    from dyrep_ray.engine.config import load_config
    from dyrep_ray.rundir.layout import CONFIG_FILE, STRUCTURE_FILE
    from tests.helpers import run_metrics

    table = pd.read_csv(sweep / "trials.csv")
    assert len(table) == 2 and set(table["trial_id"]) == set(reported)
    for column in ("status", "dyrep_cut_threshold", "lr", "best_val_top1", "grows", "cuts", "final_train_params"):
        assert column in table.columns
    assert set(table["status"]) <= {"completed", "stopped"} and (table["grows"] >= 1).all()
    for row in table.itertuples():
        run_dir = sweep / row.trial_id
        assert [m["epoch"] for m in run_metrics(run_dir)] == reported[row.trial_id]
        cfg = json.loads((run_dir / CONFIG_FILE).read_text())
        assert cfg["lr"] == pytest.approx(row.lr) and cfg["workers"] == 1
        ckpt = load_checkpoint_dir(sorted(run_dir.glob("checkpoint_epoch*"))[-1])
        assert ckpt.graph == json.loads((run_dir / STRUCTURE_FILE).read_text())
    parquet = pd.read_parquet(sweep / "trials.parquet")
    assert len(parquet) == 2 and list(parquet.columns) == list(table.columns)
    best_row = table.loc[table["best_val_top1"].idxmax()]
    best = load_config(sweep / "best_config.yaml")
    assert best.lr == pytest.approx(best_row["lr"])
    assert best.dyrep_cut_threshold == pytest.approx(best_row["dyrep_cut_threshold"])
    png = (sweep / "val_top1_vs_epoch.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
