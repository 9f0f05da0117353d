"""Where a run lives: a local/NFS directory or an object-store prefix, through pyarrow filesystems.

``storage_path`` may be ``/abs/path``, ``relative/path``, ``s3://bucket/prefix`` or
``gs://bucket/prefix``; S3-compatible stores take pyarrow's URI options, e.g.
``s3://bucket/runs?endpoint_override=http://127.0.0.1:9000&scheme=http``.
Credentials come from the environment (``AWS_ACCESS_KEY_ID`` ... / workload
identity), never from files in this project.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for ``uri``; local paths are made absolute."""
    if not is_remote(uri):
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


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
        if self.local:
            shutil.copytree(local_dir, self.path(relpath))
        else:
            pafs.copy_files(str(local_dir), self.path(relpath), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def delete_dir(self, relpath: str) -> None:
        self.fs.delete_dir(self.path(relpath))

    def temp_download(self, relpath: str) -> Path:
        """Copy a remote directory to a fresh local temp dir (caller removes it)."""
        return self.download_dir(relpath, Path(tempfile.mkdtemp(prefix="dyrep-dl-")) / relpath)
