"""Who may write a run directory: a safe name, a directory that is ours, one writer at a time.

* **Run names** (``--name``, sweep and trial names) are one path component: no ``/``, ``\\``, ``.``/``..``,
  NUL or control characters, at most :data:`MAX_NAME_LENGTH` characters.
* **A run directory** is empty or holds one of the files only dyrep-ray writes (metrics.jsonl, a
  ``checkpoint_epochNNNN`` directory, the lock or lease file, or a config.json / structure.json with the keys
  dyrep-ray writes): anything else (a user's own config.json too) is somebody else's directory and is refused
  before a byte is written.  (Which checkpoints are ours and their order:
  rundir/checkpoints.py.)
* **The writer lock**: on a local (or NFS with working ``flock``) file system an exclusive ``fcntl.flock`` on
  ``<run>/.dyrep-ray.lock``, held for the whole run by the driver (Ray workers write through it, they are the
  same run) and released by the kernel when the process dies, so a crash leaves no stale lock.  Object stores
  have no locks: a lease marker ``<run>/.dyrep-ray.lease.json`` (owner host, pid, time) is written and renewed
  every :data:`LEASE_RENEW_S` seconds; another writer is refused while the marker is younger than
  :data:`LEASE_STALE_S` seconds.  A marker older than that belongs to a writer that died and is taken over.
  (Two writers starting within the same second on an object store can still both win: a lease, not a lock.)
* **No symlinks**: a local run or sweep directory holding a symbolic link anywhere below it is refused before
  anything is written (the lock file, ``train.log``, ``tensorboard/``, checkpoints, ``report/``, ``deployed.*``
  would otherwise be written through it, outside the directory), and the lock file is opened ``O_NOFOLLOW``.
  The directory itself may be a symlink (``--output`` on another disk); what is inside it may not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from ..errors import UserError
from .checkpoints import CHECKPOINT_NAME
from .layout import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    LEASE_FILE,
    LOCK_FILE,
    METRICS_FILE,
    STRUCTURE_FILE,
)

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128
LEASE_STALE_S = 600.0
LEASE_RENEW_S = 60.0
# Files/dirs whose presence marks a directory as a dyrep-ray run (or its lock: a run that just started).
RUN_MARKERS = (METRICS_FILE, LOCK_FILE, LEASE_FILE)
# Common names that mark a run only with the content dyrep-ray writes: a user's own config.json is not ours.
OWN_CONTENT = {CONFIG_FILE: ("model", "dyrep"), STRUCTURE_FILE: ("version", "blocks")}
# Files other tools leave in any directory; they do not make it somebody else's.
IGNORABLE_ENTRIES = (".DS_Store",)


class RunDirError(UserError, ValueError):
    """A run/sweep name or run directory that dyrep-ray must not write to."""


class RunLockedError(RunDirError):
    """Another process is writing this run directory."""


# ---------------------------------------------------------------------------------------------------- names
def validate_run_name(name: str, what: str = "run") -> str:
    """Return ``name`` if it is a safe single path component, else raise :class:`RunDirError` (one line)."""
    fix = f"pass a plain {what} name such as 'exp1' (letters, digits, '-', '_', '.')"
    if not isinstance(name, str) or not name:
        raise RunDirError(f"{what} name is empty; {fix}")
    if len(name) > MAX_NAME_LENGTH:
        raise RunDirError(f"{what} name is {len(name)} characters long (at most {MAX_NAME_LENGTH}); {fix}")
    if name in (".", ".."):
        raise RunDirError(f"{what} name {name!r} is not a directory name; {fix}")
    if "/" in name or "\\" in name:
        raise RunDirError(f"{what} name {name!r} contains a path separator (it would write outside --output); "
                          f"{fix}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise RunDirError(f"{what} name {name!r} contains NUL or control characters; {fix}")
    if name != name.strip():
        raise RunDirError(f"{what} name {name!r} starts or ends with whitespace; {fix}")
    return name


def _entries(storage) -> list[str] | None:
    """Base names directly under the run dir; None if it does not exist."""
    import pyarrow.fs as pafs

    root = storage.path()
    info = storage.fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise RunDirError(f"{root} exists and is not a directory; choose another --name or --output")
    return [i.base_name for i in storage.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]


def is_run_dir(entries: list[str], storage=None) -> bool:
    """Whether a directory holding ``entries`` was written by dyrep-ray (``storage``: read config.json and
    structure.json to tell ours from a user's file of the same name)."""
    if any(e in RUN_MARKERS or CHECKPOINT_NAME.match(e) for e in entries):
        return True
    return storage is not None and any(_written_by_us(storage, name) for name in OWN_CONTENT if name in entries)


def _written_by_us(storage, name: str) -> bool:
    try:
        data = json.loads(storage.read_text(name) or "null")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and all(key in data for key in OWN_CONTENT[name])


def check_run_dir(storage, what: str = "run") -> None:
    """Refuse a non-empty directory that dyrep-ray did not write (its files would be overwritten)."""
    entries = _entries(storage)
    if not entries:
        return
    entries = [e for e in entries if e not in IGNORABLE_ENTRIES]
    if entries and not is_run_dir(entries, storage):
        raise RunDirError(f"{storage.root} is a non-empty directory that is not a dyrep-ray {what} (no "
                          f"{METRICS_FILE}, checkpoints or dyrep-ray {CONFIG_FILE}; holds e.g. "
                          f"{sorted(entries)[0]!r}); choose another --name or --output")


# ------------------------------------------------------------------------------------------------- symlinks
def find_symlink(root: str | os.PathLike) -> str | None:
    """The first symbolic link below ``root`` (its path), never following one; None if there is none."""
    for directory, dirs, files in os.walk(os.fspath(root), followlinks=False):
        for name in sorted(dirs) + sorted(files):  # os.walk lists a symlink to a directory under dirs
            path = os.path.join(directory, name)
            if os.path.islink(path):
                return path
    return None


def refuse_symlinks(root: str | os.PathLike, what: str = "run") -> None:
    """Refuse a local run/sweep directory holding a symlink: dyrep-ray would read or write through it."""
    link = find_symlink(root)
    if link is not None:
        raise RunDirError(f"{link} in the {what} directory is a symbolic link (to {os.readlink(link)!r}); "
                          "dyrep-ray never writes through links: replace it with the file or directory itself, or "
                          "use another --name")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Refuse an output path that exists and is not a regular file (a directory, device, FIFO, socket or
    symlink): writing it would replace a device node or follow the link."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device node")
    raise RunDirError(f"{option} {path} is {kind}, not a regular file; give a new or regular file path")


# ------------------------------------------------------------------------------------------------- locking
def _holder_text(info: dict) -> str:
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('started', '?')}"


class RunLock:
    """Exclusive writer lock on a run directory (``flock`` locally, a lease marker on object stores)."""

    def __init__(self, storage, what: str = "run"):
        self.storage = storage
        self.what = what
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._created: list[str] = []  # directories the lock had to create, deepest first
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": uuid.uuid4().hex}

    def _refusal(self, info: dict) -> RunLockedError:
        return RunLockedError(f"{self.storage.root} is being written by another dyrep-ray process "
                              f"({_holder_text(info)}); wait for it to finish, stop it, or use another --name")

    def acquire(self) -> RunLock:
        if self.storage.local:
            self._acquire_flock()
        else:
            self._acquire_lease_checked()
        return self

    def _acquire_flock(self) -> None:
        import fcntl

        root = self.storage.path()
        missing = root
        while missing and not os.path.exists(missing):  # created by us: removed again if the run writes nothing
            self._created.append(missing)
            missing = os.path.dirname(missing)
        try:
            if os.path.isdir(root):
                refuse_symlinks(root, self.what)
            os.makedirs(root, exist_ok=True)
            # O_NOFOLLOW: a link placed after the check above is refused too (ELOOP), never truncated through.
            fd = os.open(os.path.join(root, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # --output is a file, read-only, a name too long for the file system, ...
            raise RunDirError(f"cannot create the {self.what} directory {root} ({exc.strerror or exc}); "
                              "choose a writable --output and a shorter --name") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise self._refusal(info if isinstance(info, dict) else {}) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._owner).encode(), 0)
        self._fd = fd

    def _read_lease(self) -> dict | None:
        try:
            text = self.storage.read_text(LEASE_FILE)
            info = json.loads(text) if text else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def _write_lease(self) -> None:
        self.storage.write_text(LEASE_FILE, json.dumps({**self._owner, "renewed": time.time()}))

    def _acquire_lease_checked(self) -> None:
        try:
            self._acquire_lease()
        except OSError as exc:
            raise RunDirError(f"cannot write the lease marker in {self.storage.root} ({exc}); check the "
                              "storage_path and its credentials".splitlines()[0]) from None

    def _acquire_lease(self) -> None:
        info = self._read_lease()
        renewed = info.get("renewed") if info else None
        if isinstance(renewed, (int, float)) and time.time() - renewed < LEASE_STALE_S:
            assert info is not None  # renewed was read from it
            raise self._refusal(info)
        if info:
            logger.warning("taking over a stale lease on %s (%s, not renewed for %.0f s)", self.storage.root,
                           _holder_text(info), time.time() - renewed if isinstance(renewed, (int, float)) else -1)
        self._write_lease()
        current = self._read_lease()  # a racing writer that wrote after us wins; we back off
        if not current or current.get("token") != self._owner["token"]:
            raise self._refusal(current or {})
        self._renewer = threading.Thread(target=self._renew, name="dyrep-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                self._write_lease()
            except OSError as exc:  # keep training; the next renewal may succeed
                logger.warning("could not renew the lease on %s: %s", self.storage.root, exc)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            root = self.storage.path()
            try:  # a run that wrote nothing (refused before its first file) leaves no directory behind
                if os.listdir(root) == [LOCK_FILE]:
                    os.unlink(os.path.join(root, LOCK_FILE))
                    for directory in self._created:
                        os.rmdir(directory)  # fails (and stops) at the first one that is not empty
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join(timeout=5)
            self._renewer = None
            try:
                current = self._read_lease()
                if current and current.get("token") == self._owner["token"]:
                    self.storage.fs.delete_file(self.storage.path(LEASE_FILE))
            except OSError as exc:
                logger.warning("could not remove the lease marker of %s: %s", self.storage.root, exc)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# Temp names our writers use: ``.checkpoint_epoch0003.tmp-XXXX`` (checkpoint dirs) and ``metrics.jsonl.tmp-XXXX``
# (whole-file writes).  Only these are removed, and only while holding the lock.
_TEMP_ENTRY = re.compile(rf"^(?:\.{re.escape(CHECKPOINT_PREFIX)}epoch\d+(?:_step\d+)?|[\w.-]+)\.tmp-[\w]+$")


def remove_stale_temps(storage) -> list[str]:
    """Remove the temp files/dirs a killed writer left in the run dir (local only); returns their names."""
    import shutil

    if not storage.local:  # object stores never hold our temp dirs: uploads go file by file
        return []
    root = storage.path()
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not _TEMP_ENTRY.match(name) or ".tmp-" not in name:
            continue
        path = os.path.join(root, name)
        if os.path.islink(path):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(name)
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted write in %s: %s", len(removed), root,
                    ", ".join(removed[:5]))
    return removed


def open_run_dir(storage, name: str, what: str = "run") -> RunLock:
    """Validate ``name``, refuse a foreign directory, take the writer lock (caller releases it), then remove
    what a killed writer left half-written."""
    validate_run_name(name, what)
    check_run_dir(storage, what)
    lock = RunLock(storage, what).acquire()
    try:
        remove_stale_temps(storage)
    except OSError as exc:
        logger.warning("could not remove stale temp files in %s: %s", storage.root, exc)
    return lock
