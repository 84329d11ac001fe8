"""The start-up check: a torn or damaged data dir stops the service before it serves anything.

SQLite's `PRAGMA quick_check` vouches for the database file. Every snapshot row must find each of
its blobs on disk; the blobs of each loop's root and best snapshot (what the next candidates build
on, and what users download) are also read back and hashed. `verify_blobs=all` hashes every blob,
`exists` only looks, `off` skips the blob check. A problem refuses the start with a message that
names what is damaged and what to do, rather than running candidates against a broken parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from .snapshots import SnapshotStore, decode_manifest
from .store import SnapshotRef, Store

__all__ = ["DataDamaged", "open_verified", "verify"]

log = logging.getLogger("ratchet.integrity")
_LISTED = 10  # problems named in the message; the rest are counted


class DataDamaged(RuntimeError):
    """The data dir failed the start-up check; the message says what and how to go on."""


async def open_verified(
    store: Store, snapshots: SnapshotStore, mode: str, stack: contextlib.AsyncExitStack
) -> None:
    """Opens the store (closed by `stack`) and checks the data dir; DataDamaged when it fails."""
    try:
        await store.open()
    except sqlite3.DatabaseError as exc:
        raise DataDamaged(
            f"the database {store.path} is damaged ({exc}). Restore it from a backup; the service will"
            " not start on it"
        ) from exc
    stack.push_async_callback(store.close)
    swept = await asyncio.to_thread(snapshots.sweep_temporary)
    if swept:
        log.info("start-up: removed %d temporary blob file(s) left by an interrupted write", swept)
    await verify(store, snapshots, mode)


async def verify(store: Store, snapshots: SnapshotStore, mode: str) -> None:
    try:
        problems = await store.quick_check()
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems:
        raise DataDamaged(
            f"the database {store.path} is damaged (PRAGMA quick_check: {'; '.join(problems[:_LISTED])})."
            " Restore it from a backup; the service will not start on it"
        )
    if mode == "off":
        return
    refs = await store.snapshot_refs()
    damaged = await asyncio.to_thread(_check_blobs, snapshots, refs, mode)
    if damaged:
        listed = "; ".join(damaged[:_LISTED])
        more = f" (and {len(damaged) - _LISTED} more)" if len(damaged) > _LISTED else ""
        raise DataDamaged(
            f"snapshot blobs under {snapshots.root} are missing or damaged: {listed}{more}."
            " Restore the blobs directory from a backup, or start with RATCHET_VERIFY_BLOBS=off to"
            " serve anyway (experiments built on a damaged snapshot will end as error)"
        )
    log.info("start-up check: database ok, blobs of %d snapshot(s) ok (%s)", len(refs), mode)


def _check_blobs(snapshots: SnapshotStore, refs: list[SnapshotRef], mode: str) -> list[str]:
    damaged: list[str] = []
    seen: set[str] = set()
    for ref in refs:
        snapshot_id, loops = ref.id, ref.loops
        deep = mode == "all" or (mode == "best" and loops is not None)
        for entry in decode_manifest(ref.manifest).files:
            key = f"{entry.blob}:{deep}"
            if key in seen:
                continue
            seen.add(key)
            problem = _blob_problem(snapshots, entry.blob, entry.size, deep)
            if problem:
                owner = f", root or best of loop {loops}" if loops else ""
                damaged.append(
                    f"{entry.path} of snapshot {snapshot_id[:7]}{owner}: blob {entry.blob} {problem}"
                )
    return damaged


def _blob_problem(snapshots: SnapshotStore, blob: str, size: int, deep: bool) -> str | None:
    path = snapshots.blob_path(blob)
    if not path.is_file():
        return "is missing"
    if not deep:
        return None
    try:
        data = snapshots.get_blob(blob)
    except OSError as exc:
        return str(exc).removeprefix(f"blob {blob} ")
    if len(data) != size:
        return f"holds {len(data)} bytes, not {size}"
    return None
