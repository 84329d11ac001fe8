"""Content-addressed snapshots: files are blobs named by their SHA-256, a snapshot is the hash of
its manifest (sorted paths -> blob ids). A thousand one-line edits cost a thousand small blobs.

Blobs are written to a temporary name, fsynced, renamed and the directory fsynced, so a row that
points at a blob is only ever written after the blob is durable. `service.integrity` checks at
start-up that every blob a row points at is there (and, for the snapshots that matter most, intact).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path

import msgspec

from . import faults

__all__ = ["Manifest", "SnapshotStore", "Tree"]

Tree = dict[str, bytes]


class Entry(msgspec.Struct, array_like=True, frozen=True):
    path: str
    blob: str
    size: int
    executable: bool = False


class Manifest(msgspec.Struct, frozen=True):
    files: list[Entry]

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """Blob files under `root`; manifests are kept by the caller (the database)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _blob_path(self, blob: str) -> Path:
        return self.root / blob[:2] / blob[2:]

    def put_blob(self, data: bytes) -> str:
        blob = hashlib.sha256(data).hexdigest()
        path = self._blob_path(blob)
        if path.exists():
            return blob
        if not path.parent.exists():
            path.parent.mkdir(exist_ok=True)
            _fsync_dir(self.root)  # the new shard directory's entry must be as durable as the blob
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(zlib.compress(data, 6))
            fh.flush()
            os.fsync(fh.fileno())
        faults.point("snapshot.blob_tmp")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return blob

    def blob_path(self, blob: str) -> Path:
        return self._blob_path(blob)

    def get_blob(self, blob: str) -> bytes:
        try:
            data = zlib.decompress(self._blob_path(blob).read_bytes())
        except zlib.error as exc:
            raise OSError(f"blob {blob} is corrupt: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != blob:
            raise OSError(f"blob {blob} is corrupt")
        return data

    def put_tree(self, tree: Tree, executable: frozenset[str] = frozenset()) -> Manifest:
        """Writes every blob durably; returns the manifest (its `.id` is the snapshot id)."""
        entries = [
            Entry(path, self.put_blob(data), len(data), path in executable)
            for path, data in sorted(tree.items())
        ]
        return Manifest(entries)

    def load_tree(self, manifest: Manifest) -> Tree:
        return {e.path: self.get_blob(e.blob) for e in manifest.files}

    def archive(self, manifest: Manifest, prefix: str = "") -> bytes:
        """The whole tree as a .tar.gz (regular files only, owned by nobody in particular)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for e in manifest.files:
                data = self.get_blob(e.blob)
                info = tarfile.TarInfo(prefix + e.path)
                info.size, info.mode, info.mtime = len(data), 0o755 if e.executable else 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def size_on_disk(self) -> int:
        total = 0
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, name))
        return total


def decode_manifest(raw: str | bytes) -> Manifest:
    return msgspec.json.decode(raw, type=Manifest)
