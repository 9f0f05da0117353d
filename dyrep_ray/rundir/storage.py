"""Where a run lives: a local/NFS directory or an object-store prefix, through pyarrow filesystems.

``storage_path`` may be ``/abs/path``, ``relative/path``, ``file:///abs/path``,
``s3://bucket/prefix`` or ``gs://bucket/prefix``.  S3-compatible stores (MinIO, Ceph,
R2, ...) take pyarrow's S3 URI query options, e.g.
``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http`` (also ``region=``,
``tls_ca_file_path=``, ``tls_verify_certificates=``, ``allow_bucket_creation=``; see
``pyarrow.fs.FileSystem.from_uri``).  Credentials come from the environment of every
process that touches the store (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
instance roles, IRSA / workload identity), never from the URI or from files in
this project.

Object stores have no atomic rename: a directory is uploaded file by file with
its commit file (the checkpoint ``MANIFEST.json``) last, so an interrupted upload
leaves a directory that fails verification and is skipped on resume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from .layout import MANIFEST_FILE

# Written last by upload_dir (and deleted first when a directory is replaced):
# the file whose presence makes a checkpoint directory complete.
COMMIT_FILES = (MANIFEST_FILE,)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for ``uri``; local paths are made absolute."""
    if not is_remote(uri):
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def as_storage(run_dir: str | Path | RunStorage) -> RunStorage:
    """The :class:`RunStorage` of a run directory given as a path, ``file://``/object-store URI or storage."""
    if isinstance(run_dir, RunStorage):
        return run_dir
    text = str(run_dir).rstrip("/")
    parent, _, name = text.rpartition("/")
    return RunStorage(parent or ".", name)


class RunStorage:
    """Files of one run directory ``<storage>/<name>`` on any pyarrow filesystem."""

    def __init__(self, storage_uri: str, name: str):
        self.fs, base = resolve_filesystem(storage_uri)
        self.root = f"{base}/{name}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relpath: str = "") -> str:
        return f"{self.root}/{relpath}" if relpath else self.root

    def write_text(self, relpath: str, text: str) -> None:
        """Whole-file write; atomic (temp + rename) locally, single PUT on object stores."""
        target = self.path(relpath)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(text.encode())
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(text.encode())

    def read_text(self, relpath: str) -> str | None:
        info = self.fs.get_file_info(self.path(relpath))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(relpath)) as f:
            return f.read().decode()

    def list_dirs(self, prefix: str = "") -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.Directory
                      and i.base_name.startswith(prefix))

    def download_dir(self, relpath: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(relpath), str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def upload_dir(self, local_dir: str | Path, relpath: str) -> None:
        """Copy ``local_dir`` to ``<run>/<relpath>``, replacing what is there.

        Locally: copy to a sibling temp dir, then rename (atomic).  Object stores: delete
        the old commit file(s) and the old directory, upload every other file, then the
        commit file(s), so a reader never sees a complete-looking partial directory.
        """
        local_dir = Path(local_dir)
        target = self.path(relpath)
        if self.local:
            parent, _, base = target.rpartition("/")
            tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"  # hidden: never listed as a checkpoint
            shutil.copytree(local_dir, tmp)
            if Path(target).exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            return
        if self.fs.get_file_info(target).type == pafs.FileType.Directory:
            for name in COMMIT_FILES:
                if self.fs.get_file_info(f"{target}/{name}").type == pafs.FileType.File:
                    self.fs.delete_file(f"{target}/{name}")
            self.fs.delete_dir(target)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local_dir).as_posix() in COMMIT_FILES)  # stable: commit last
        local_fs = pafs.LocalFileSystem()
        for path in files:
            dest = f"{target}/{path.relative_to(local_dir).as_posix()}"  # object stores need no parent dirs
            pafs.copy_files(str(path), dest, source_filesystem=local_fs, destination_filesystem=self.fs)

    def write_dir(self, relpath: str, write) -> None:
        """``write(path)`` builds directory ``<run>/<relpath>`` (a checkpoint writer): in place locally (what a
        killed run left there is replaced; the writer itself commits atomically), in a local temp directory
        uploaded with :meth:`upload_dir` on object stores.  The writer's ``OSError`` propagates."""
        if self.local:
            target = Path(self.path(relpath))
            if target.exists():
                shutil.rmtree(target)
            write(target)
            return
        tmp = Path(tempfile.mkdtemp(prefix="dyrep-ckpt-"))
        try:
            write(tmp / relpath)
            self.upload_dir(tmp / relpath, relpath)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete_dir(self, relpath: str) -> None:
        self.fs.delete_dir(self.path(relpath))

    def temp_download(self, relpath: str) -> Path:
        """Copy a remote directory to a fresh local temp dir (caller removes its parent); a failed copy (an object
        key that is no file name, a lost connection) removes what it wrote."""
        base = Path(tempfile.mkdtemp(prefix="dyrep-dl-"))
        try:
            return self.download_dir(relpath, base / relpath)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
