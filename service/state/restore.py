"""A backup made by `backup` written out as a fresh data dir, checked before it is put in place.

1. Every file `backup.json` lists must be there with its size and SHA-256 (a truncated copy, a
   flipped bit, a missing blob all stop the restore, named).
2. The files are copied into a temporary directory next to the target.
3. The copy is opened as the service would open it (migrations included), and experiments the
   backup caught `running` are queued again through the state machine: their containers belonged
   to the service the backup was taken from, so the restored service runs them from the start.
   With `pause`, active loops are paused, so nothing runs until someone resumes them.
4. The start-up check of `integrity` runs on it with every blob hashed (`all`).
5. Only then is the directory renamed into place. A target that exists and is not empty is refused.

Browser sessions are not carried over (everyone logs in again); tokens and webhooks are, and
webhook deliveries that were pending are sent by the restored service (receivers that saw one
already tell by its `id`).

The restored data dir gets no `instance-id`: its first start makes a new one, so its service never
mistakes the containers of the service the backup came from (which may still be running on this
engine) for its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import msgspec

from . import sessions, transitions
from .backup import (
    BACKUP_FORMAT,
    MANIFEST_NAME,
    BackupFile,
    BackupManifest,
    Progress,
    fsync_dir,
    sha256_file,
)
from .integrity import DataDamaged, verify
from .snapshots import SnapshotStore
from .store import Store

__all__ = ["RestoreError", "Restored", "check_backup", "restore"]

_LISTED = 10


class RestoreError(RuntimeError):
    """The backup is not sound, or the target is not free; nothing was written to the target."""


class Restored(msgspec.Struct, kw_only=True, frozen=True):
    manifest: BackupManifest
    requeued: list[str]  # experiments running at backup time, queued again
    paused: list[str]  # loops paused by `pause`


def _no_progress(phase: str, done: int, total: int, nbytes: int) -> None:
    return None


def check_backup(src: Path, progress: Progress = _no_progress) -> BackupManifest:
    """The backup's manifest, once every file it lists is there and hashes right."""
    path = src / MANIFEST_NAME
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=BackupManifest)
    except FileNotFoundError:
        raise RestoreError(
            f"{path} is missing: {src} is not a Ratchet backup (made by `ratchet backup`)"
        ) from None
    except msgspec.DecodeError as exc:
        raise RestoreError(f"{path} cannot be read ({exc}): the backup is damaged") from exc
    if manifest.format != BACKUP_FORMAT:
        raise RestoreError(f"{src} is a {manifest.format!r} backup; this Ratchet reads {BACKUP_FORMAT!r}")
    problems: list[str] = []
    nbytes = 0
    for n, entry in enumerate(manifest.files, 1):
        problem = _file_problem(src, entry)
        if problem:
            problems.append(problem)
        nbytes += entry.size
        if n % 200 == 0 or n == len(manifest.files):
            progress("check", n, len(manifest.files), nbytes)
    if problems:
        more = f" (and {len(problems) - _LISTED} more)" if len(problems) > _LISTED else ""
        raise RestoreError(f"the backup {src} is damaged: {'; '.join(problems[:_LISTED])}{more}")
    return manifest


def _file_problem(root: Path, entry: BackupFile) -> str | None:
    if entry.path.startswith("/") or ".." in entry.path.split("/"):
        return f"{entry.path}: not a path inside the backup"
    path = root / entry.path
    if not path.is_file():
        return f"{entry.path} is missing"
    size, digest = sha256_file(path)
    if size != entry.size:
        return f"{entry.path} holds {size} bytes, not {entry.size}"
    if digest != entry.sha256:
        return f"{entry.path} does not hash to the SHA-256 recorded for it"
    return None


async def restore(
    src: Path, data_dir: Path, progress: Progress = _no_progress, pause: bool = False
) -> Restored:
    """Checks the backup `src` and writes it out as the new data dir `data_dir`."""
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise RestoreError(
            f"{data_dir} is not empty; restore into a new directory (a restore never overwrites a data dir)"
        )
    manifest = check_backup(src, progress)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    work = data_dir.parent / f".{data_dir.name}.restoring-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        _copy_files(src, work, manifest.files, progress)
        requeued, paused = await _open_and_check(work, pause, progress)
        if data_dir.exists():
            data_dir.rmdir()  # empty, checked above
        os.replace(work, data_dir)
        fsync_dir(data_dir.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Restored(manifest=manifest, requeued=requeued, paused=paused)


def _copy_files(src: Path, work: Path, files: list[BackupFile], progress: Progress) -> None:
    (work / "blobs").mkdir(mode=0o700)
    (work / "logs").mkdir(mode=0o700)
    dirs: set[Path] = {work, work / "blobs", work / "logs"}
    nbytes = 0
    for n, entry in enumerate(files, 1):
        target = work / entry.path
        if target.parent not in dirs:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            dirs.add(target.parent)
        shutil.copyfile(src / entry.path, target)
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())
        nbytes += entry.size
        if n % 200 == 0 or n == len(files):
            progress("copy", n, len(files), nbytes)
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)


async def _open_and_check(work: Path, pause: bool, progress: Progress) -> tuple[list[str], list[str]]:
    store = Store(work / "ratchet.db")
    try:
        await store.open()
    except Exception as exc:
        raise RestoreError(f"the backup's database does not open: {exc}") from exc
    try:
        requeued = await store.running_ids()
        for exp_id in requeued:
            await transitions.requeue(store, exp_id)
        await sessions.delete_all(store)  # browsers log in again to a restored service
        paused: list[str] = []
        if pause:
            for loop_id, _ in await store.active_loops():
                await transitions.set_loop_state(store, loop_id, "pause")
                paused.append(loop_id)
        progress("start-up check", 0, 1, 0)
        try:
            await verify(store, SnapshotStore(work / "blobs"), "all")
        except DataDamaged as exc:
            raise RestoreError(f"the restored copy fails the start-up check: {exc}") from exc
        progress("start-up check", 1, 1, 0)
        return requeued, paused
    finally:
        with contextlib.suppress(Exception):
            await store.close()
