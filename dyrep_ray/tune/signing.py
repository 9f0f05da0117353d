"""Sign the files Ray Tune unpickles on ``--resume``, and refuse to resume a sweep whose files do not verify.

``Tuner.restore`` unpickles ``tune/tuner.pkl``, cloudpickled fields inside ``experiment_state-*.json``, the
searcher and callback states (``*-state-*``), and per-trial files (``params.pkl``, ``error.pkl``, class-trainable
checkpoints).  Whoever can write one of them into a sweep directory can run code as the user who resumes it.
So dyrep-ray records, for *every* file under ``<sweep>/tune/``, its SHA-256 in ``<sweep>/tune.signature.json``
and authenticates that list with HMAC-SHA256 under a per-user secret that never enters the sweep directory:
``$DYREP_RAY_SECRET_FILE``, else ``$XDG_CONFIG_HOME/dyrep-ray/secret`` (``~/.config/dyrep-ray/secret``), created
with mode 0600 on first use.  Before ``Tuner.restore`` every file under ``tune/`` must be listed with its exact
digest (a listed file that has since disappeared is fine: nothing reads it).

What this protects: a sweep directory (local, NFS, a shared bucket) in which somebody else can write cannot
make your ``--resume`` unpickle their file.  What it does not: someone who can read your secret file (your
account, root) or who writes into ``tune/`` *while your sweep runs* (the files are signed as found when the
sweep signs them: at every experiment-state save, at the end and on interruption).  Another user resuming your
sweep, or you resuming it from another machine without copying the secret, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from ray.tune import Callback

from ..errors import UserError
from ..rundir.layout import SWEEP_FILE, SWEEP_SIGNATURE, TUNE_DIR
from ..rundir.storage import RunStorage

logger = logging.getLogger(__name__)

SECRET_ENV = "DYREP_RAY_SECRET_FILE"
SECRET_BYTES = 32
SIGNATURE_VERSION = 1
ALGORITHM = "HMAC-SHA256"
#: Re-sign at most this often while a sweep runs (a crash after the last signing leaves files that still verify,
#: unless Ray rewrote one in between: then the sweep cannot be resumed, see the refusal message).
SIGN_INTERVAL_S = 5.0
_HASH_CHUNK = 1 << 20


class SweepSignatureError(UserError):
    """A sweep's Tune files are not (or no longer) the ones this user's dyrep-ray wrote."""


def secret_path() -> Path:
    override = os.environ.get(SECRET_ENV)
    if override:
        return Path(override).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "dyrep-ray" / "secret"


def load_secret(create: bool) -> bytes:
    """The per-user signing key; ``create``: make it (0600) when missing.  Refused if others can read it."""
    path = secret_path()
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another dyrep-ray created it a moment ago: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(SECRET_BYTES))
            logger.info("created the sweep signing key %s (keep it private; it never enters a sweep directory)",
                        path)
    try:
        info = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise SweepSignatureError(f"no signing key {path}: this user's dyrep-ray never signed a sweep here; "
                                  f"copy your key there (or set {SECRET_ENV}) to resume") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepSignatureError(f"cannot read the signing key {path} ({exc}); fix its permissions or set "
                                  f"{SECRET_ENV}".splitlines()[0]) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SweepSignatureError(f"the signing key {path} is accessible to other users (mode "
                                  f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise SweepSignatureError(f"the signing key {path} belongs to another user; set {SECRET_ENV} to your own")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < SECRET_BYTES // 2:
        raise SweepSignatureError(f"the signing key {path} is malformed; remove it (sweeps signed with it can then "
                                  "no longer be resumed) or restore it from a backup")
    return key


#: ``{file path: (size, mtime_ns, sha256)}``: re-signing a running sweep hashes only what changed.
DigestCache = dict[str, tuple[int, int, str]]


#: sweep.json's key in the signed list (relative to tune/): the sweep as started, which --resume runs (its base
#: config names data paths and a tracking URI: a replaced one would send the resumed trials elsewhere).
SWEEP_FILE_KEY = f"../{SWEEP_FILE}"


def _tune_files(root: RunStorage, cache: DigestCache | None = None) -> dict[str, str]:
    """``{path relative to tune/: sha256 hex}`` of every file under ``<sweep>/tune/``, and of sweep.json."""
    import pyarrow.fs as pafs

    base = root.path(TUNE_DIR)
    infos = root.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    sweep_file = root.fs.get_file_info(root.path(SWEEP_FILE))
    if sweep_file.type == pafs.FileType.File:
        infos.append(sweep_file)
    digests = {}
    for info in infos:
        if info.type == pafs.FileType.Directory:
            continue
        relative = SWEEP_FILE_KEY if info.path == sweep_file.path else info.path[len(base):].lstrip("/")
        stamp = (info.size or 0, info.mtime_ns or 0)
        cached = cache.get(info.path) if cache is not None else None
        if cached is not None and cached[:2] == stamp:
            digests[relative] = cached[2]
            continue
        digest = hashlib.sha256()
        with root.fs.open_input_stream(info.path) as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
        digests[relative] = digest.hexdigest()
        if cache is not None:
            cache[info.path] = (*stamp, digests[relative])
    return digests


def _mac(key: bytes, files: dict[str, str]) -> str:
    body = json.dumps({"version": SIGNATURE_VERSION, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign_sweep(root: RunStorage, cache: DigestCache | None = None) -> int:
    """Sign every file now under ``<sweep>/tune/``; returns how many.  Creates the key on first use."""
    key = load_secret(create=True)
    files = _tune_files(root, cache)
    root.write_text(SWEEP_SIGNATURE, json.dumps({
        "version": SIGNATURE_VERSION, "algorithm": ALGORITHM, "signed": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "key_id": hashlib.sha256(b"dyrep-ray key id" + key).hexdigest()[:16], "files": files,
        "mac": _mac(key, files)}, indent=1, sort_keys=True))
    return len(files)


def verify_sweep(root: RunStorage) -> None:
    """Raise :class:`SweepSignatureError` (one line naming the file) unless every file under ``tune/`` verifies."""
    refuse = ("was not written by this user's dyrep-ray (Ray would unpickle it on --resume, which can run "
              "arbitrary code); refusing to resume: inspect the directory, or start a new sweep with another --name")
    where = root.path(SWEEP_SIGNATURE)
    try:
        text = root.read_text(SWEEP_SIGNATURE)
        signed = json.loads(text) if text is not None else None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        signed = "unreadable"
    if signed is None:
        raise SweepSignatureError(f"{root.path(TUNE_DIR)} has no signature ({SWEEP_SIGNATURE} missing): it "
                                  f"{refuse}")
    files = signed.get("files") if isinstance(signed, dict) else None
    mac = signed.get("mac") if isinstance(signed, dict) else None
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            and isinstance(mac, str)):
        raise SweepSignatureError(f"{where} is malformed: the sweep {refuse}")
    key = load_secret(create=False)
    if not hmac.compare_digest(_mac(key, files), mac):
        raise SweepSignatureError(f"{where} does not verify with this user's key ({secret_path()}): the sweep "
                                  f"{refuse}")
    for relative, digest in sorted(_tune_files(root).items()):
        if files.get(relative) != digest:
            state = "is not in the signature" if relative not in files else "changed after it was signed"
            path = root.path(SWEEP_FILE) if relative == SWEEP_FILE_KEY else f"{root.path(TUNE_DIR)}/{relative}"
            raise SweepSignatureError(f"{path} {state}: it {refuse}")


_signing: dict[str, RunStorage] = {}  # the sweep this process is fitting now (see signing_while_fitting)


@contextmanager
def signing_while_fitting(root: RunStorage):
    """While the sweep at ``root`` runs in this process, :class:`SignSweepCallback` re-signs it; at the end
    (also when ``fit`` raises or is interrupted) it is signed once more, after Ray's last write."""
    _signing["root"] = root
    try:
        yield
    finally:
        _signing.pop("root", None)
        try:
            logger.info("signed %d Tune file(s) of %s", sign_sweep(root), root.root)
        except (OSError, UserError) as exc:  # do not mask what ended the fit; --resume will refuse and say so
            logger.error("could not sign the Tune files of %s (--resume will refuse it): %s", root.root, exc)


class SignSweepCallback(Callback):
    """Tune callback (the driver's ``on_step_end``): re-sign ``tune/`` at most every :data:`SIGN_INTERVAL_S`
    seconds, so that a sweep killed mid-run (which misses the end-of-sweep signing) can still be resumed.

    It is pickled into tuner.pkl with the RunConfig, so it holds no key and no location: it signs the sweep
    :func:`signing_while_fitting` names (the same after a resume from a moved directory).
    """

    def __init__(self):
        self._last = 0.0
        self._cache: DigestCache = {}

    def __getstate__(self) -> dict:
        return {"_last": 0.0, "_cache": {}}

    def on_step_end(self, iteration, trials, **info):
        root = _signing.get("root")
        if root is None or time.monotonic() - self._last < SIGN_INTERVAL_S:
            return
        self._last = time.monotonic()
        try:
            sign_sweep(root, self._cache)
        except (OSError, UserError) as exc:  # training goes on; the end-of-sweep signing reports a lasting problem
            logger.warning("could not sign the sweep's Tune files: %s", exc)
