"""A consistent copy of a data dir, taken while its service runs.

The database is copied with SQLite's online backup API in one step: one read transaction, so the
copy is the database as it stood at one commit, whatever the service writes meanwhile (a WAL
reader never blocks the writer). Blobs and logs are plain files, copied *after* that snapshot and
only those the copied database points at:

- blobs are content-addressed and never change once written, and a row is only written after the
  blob it points at is durable, so every blob the snapshot names is there, complete, for good. A
  blob stored as a delta needs its base: the chain is followed, and each copy is read back through
  the delta chain and hashed.
- a log file is written before the verdict that ends its experiment, and never again after it, so
  the logs of the experiments the snapshot shows as ended are final. Experiments still queued or
  running in the snapshot have no log yet as far as the copy is concerned (a restore queues them
  again).

The copy is made under a temporary name next to DEST and renamed at the end, so a DEST that exists
is a complete backup. `backup.json` lists every file with its size and SHA-256 (`restore` checks
them before anything else). The backup holds the webhook secrets and token hashes of the service:
it is written readable by its owner only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from ..models import RUN_OVER
from .snapshots import DELTA_MAGIC, SnapshotStore, decode_manifest

__all__ = [
    "BACKUP_FORMAT",
    "MANIFEST_NAME",
    "BackupError",
    "BackupFile",
    "BackupManifest",
    "Progress",
    "backup",
    "fsync_dir",
    "log_names",
    "sha256_file",
]

BACKUP_FORMAT = "ratchet-backup/1"
MANIFEST_NAME = "backup.json"
DB_NAME = "ratchet.db"
# Progress callback: (phase, items done, items in all, bytes copied so far).
Progress = Callable[[str, int, int, int], None]


class BackupError(RuntimeError):
    """The backup cannot be made; the message says why and what to do."""


class BackupFile(msgspec.Struct, frozen=True, array_like=True):
    path: str  # relative to the backup's root, with `/`
    size: int
    sha256: str


class BackupManifest(msgspec.Struct, kw_only=True, frozen=True):
    format: str = BACKUP_FORMAT
    created_at: float
    source: str  # the data dir it was taken from (for the humans reading it)
    schema_version: int
    counts: dict[str, int]  # loops, experiments, snapshots, blobs, logs, queued, running
    files: list[BackupFile]


def sha256_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_names(exp_id: str, present: set[str]) -> list[str]:
    """The files under logs/ that belong to an experiment: its log and any `<id>.<part>.log`
    beside it, never a half-written `.tmp`."""
    return sorted(
        n for n in present if n == f"{exp_id}.log" or (n.startswith(f"{exp_id}.") and n.endswith(".log"))
    )


def _no_progress(phase: str, done: int, total: int, nbytes: int) -> None:
    return None


def backup(data_dir: Path, dest: Path, progress: Progress = _no_progress) -> BackupManifest:
    """Copies `data_dir` (its service may be running) to the new directory `dest`."""
    source_db = data_dir / DB_NAME
    if not source_db.is_file():
        raise BackupError(f"{source_db} does not exist: {data_dir} is not a Ratchet data dir")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists and is not empty; name a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        manifest = _copy(data_dir, work, progress)
        _write_manifest(work, manifest)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(work, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _copy(data_dir: Path, work: Path, progress: Progress) -> BackupManifest:
    created_at = time.time()
    files = [_snapshot_database(data_dir / DB_NAME, work / DB_NAME, progress)]
    db = sqlite3.connect(work / DB_NAME)
    try:
        blobs, ended, counts, version = _what_it_points_at(db)
    finally:
        db.close()
    blob_files = _copy_blobs(data_dir / "blobs", work / "blobs", blobs, progress)
    log_files = _copy_logs(data_dir / "logs", work / "logs", ended, progress)
    counts.update(blobs=len(blob_files), logs=len(log_files))
    return BackupManifest(
        created_at=created_at,
        source=str(data_dir.resolve()),
        schema_version=version,
        counts=counts,
        files=files + blob_files + log_files,
    )


def _snapshot_database(source: Path, target: Path, progress: Progress) -> BackupFile:
    """The database at one commit, as a single self-contained file (no -wal beside it)."""
    progress("database", 0, 1, 0)
    # Read-only: a backup never writes to the data dir it copies (no checkpoint on close).
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.execute("PRAGMA busy_timeout=30000")
        src.backup(dst)  # all pages in one step: one read transaction, one consistent state
        dst.execute("PRAGMA journal_mode=DELETE")
        problems = [r[0] for r in dst.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise BackupError(
                f"the copy of {source} fails SQLite's integrity check ({'; '.join(problems[:5])}):"
                " the source database is damaged"
            )
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"cannot copy the database {source}: {exc}") from exc
    finally:
        dst.close()
        src.close()
    _fsync(target)
    size, digest = sha256_file(target)
    progress("database", 1, 1, size)
    return BackupFile(DB_NAME, size, digest)


def _what_it_points_at(db: sqlite3.Connection) -> tuple[set[str], list[str], dict[str, int], int]:
    """(blobs of every snapshot, experiments whose run has ended, counts, schema version)."""
    blobs: set[str] = set()
    snapshots = 0
    for (raw,) in db.execute("SELECT manifest FROM snapshots"):
        snapshots += 1
        blobs.update(entry.blob for entry in decode_manifest(raw).files)
    ended_statuses = sorted(s.value for s in RUN_OVER)
    marks = ",".join("?" * len(ended_statuses))
    ended = [
        r[0] for r in db.execute(f"SELECT id FROM experiments WHERE status IN ({marks})", ended_statuses)
    ]
    by_status = dict(db.execute("SELECT status, COUNT(*) FROM experiments GROUP BY status").fetchall())
    counts = {
        "loops": db.execute("SELECT COUNT(*) FROM loops").fetchone()[0],
        "experiments": sum(by_status.values()),
        "snapshots": snapshots,
        "queued": by_status.get("queued", 0),
        "running": by_status.get("running", 0),
    }
    version = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
    return blobs, ended, counts, version


def _copy_blobs(source: Path, target: Path, wanted: set[str], progress: Progress) -> list[BackupFile]:
    """Copies each blob file as it is (compressed, or a delta) and the bases its deltas need, then
    reads every copy back through the copied store: each must hash to its name."""
    target.mkdir(mode=0o700)
    pending, done, copied, nbytes = sorted(wanted), set(), [], 0
    total = len(pending)
    while pending:
        blob = pending.pop()
        if blob in done:
            continue
        raw = _read_source_blob(source, blob)
        if raw.startswith(DELTA_MAGIC):
            base = raw[len(DELTA_MAGIC) : len(DELTA_MAGIC) + 32].hex()
            if base not in done and base not in pending:
                pending.append(base)
                total += 1
        path = target / blob[:2] / blob[2:]
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _write(path, raw)
        done.add(blob)
        nbytes += len(raw)
        copied.append(BackupFile(f"blobs/{blob[:2]}/{blob[2:]}", len(raw), hashlib.sha256(raw).hexdigest()))
        if len(done) % 200 == 0:
            progress("blobs", len(done), total, nbytes)
    progress("blobs", len(done), total, nbytes)
    for shard in {target / b[:2] for b in done}:
        fsync_dir(shard)
    fsync_dir(target)
    _verify_blobs(target, sorted(done), progress)
    return sorted(copied, key=lambda f: f.path)


def _read_source_blob(source: Path, blob: str) -> bytes:
    try:
        return (source / blob[:2] / blob[2:]).read_bytes()
    except FileNotFoundError:
        raise BackupError(
            f"blob {blob} is missing under {source}, yet the database points at it: the data dir is"
            " damaged (its service would refuse to start); repair it before backing it up"
        ) from None


def _verify_blobs(root: Path, blobs: list[str], progress: Progress) -> None:
    store = SnapshotStore(root)
    for n, blob in enumerate(blobs, 1):
        try:
            store.get_blob(blob)  # follows the delta chain and checks the SHA-256 of the content
        except OSError as exc:
            raise BackupError(f"the copy of blob {blob} does not read back: {exc}") from exc
        if n % 200 == 0 or n == len(blobs):
            progress("verify", n, len(blobs), 0)


def _copy_logs(source: Path, target: Path, ended: list[str], progress: Progress) -> list[BackupFile]:
    target.mkdir(mode=0o700)
    present = set(os.listdir(source)) if source.is_dir() else set()
    names = [name for exp_id in ended for name in log_names(exp_id, present)]
    copied, nbytes = [], 0
    for n, name in enumerate(names, 1):
        with contextlib.suppress(FileNotFoundError):  # listed a moment ago; logs are never deleted
            data = (source / name).read_bytes()
            _write(target / name, data)
            nbytes += len(data)
            copied.append(BackupFile(f"logs/{name}", len(data), hashlib.sha256(data).hexdigest()))
        if n % 200 == 0 or n == len(names):
            progress("logs", n, len(names), nbytes)
    fsync_dir(target)
    return copied


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)


def _write_manifest(work: Path, manifest: BackupManifest) -> None:
    _write(work / MANIFEST_NAME, msgspec.json.format(msgspec.json.encode(manifest)))
    fsync_dir(work)
