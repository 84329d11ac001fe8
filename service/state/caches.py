"""Loop caches as stored: one tar file per loop under the data dir's `caches/`, and a row in
`loop_caches` that says it is there. The file is never unpacked here: it goes into runs as it is
(the sandbox copies it into each run's own cache directory), so nothing in it touches the host.

The file is written and fsynced before its row (as snapshot blobs are); a row is only ever added
while the loop has none, so of two baseline runs finishing together the first one's cache stands.
Clearing removes the row first, then the file."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import sqlite3
import tarfile
import time
from pathlib import Path

from .database import fetch
from .store import Store

__all__ = ["CacheStore", "tar_stats"]

log = logging.getLogger("ratchet.caches")


def tar_stats(data: bytes) -> tuple[int, int]:
    """(content bytes, regular files) of a tar."""
    size = files = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            if member.isfile():
                size += member.size
                files += 1
    return size, files


class CacheStore:
    def __init__(self, store: Store, root: Path, max_bytes: int) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes  # 0: caches are off

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    async def load(self, loop_id: str) -> bytes:
        """The loop's cache as a tar, or b"" when it has none (or it is over the bound)."""
        name = await self.store.cache_file(loop_id)
        if name is None or not self.enabled:
            return b""
        try:
            return await asyncio.to_thread((self.root / name).read_bytes)
        except FileNotFoundError:  # cleared meanwhile
            return b""

    async def keep(self, loop_id: str, exp_id: str, data: bytes) -> bool:
        """Store what a trusted run left as the loop's cache, unless the loop has one already.
        Over the bound, only its size is recorded (state `too_large`), so the loop view says why
        runs start without one."""
        size, files = await asyncio.to_thread(tar_stats, data)
        if files == 0:  # nothing to give later runs: a later baseline run may still fill it
            return False
        name: str | None = None
        if size <= self.max_bytes:
            name = f"{loop_id}-{exp_id}.tar"
            await asyncio.to_thread(self._write, name, data)
        state = "filled" if name else "too_large"

        def insert(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO loop_caches"
                " (loop_id, state, bytes, files, experiment, filled_at, file) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (loop_id, state, size, files, exp_id, time.time(), name),
            )
            return cur.rowcount == 1

        added = await self.store.write(insert)
        if not added and name:
            await asyncio.to_thread(self._unlink, name)
        elif added:
            log.info("loop %s: cache %s by %s: %d bytes in %d files", loop_id, state, exp_id, size, files)
        return added

    async def clear(self, loop_id: str) -> bool:
        """Forget the loop's cache; runs start without one until a trusted run fills it again."""

        def delete(db: sqlite3.Connection) -> str | None:
            row = fetch(db, "SELECT file FROM loop_caches WHERE loop_id = ?", (loop_id,), first=True)
            db.execute("DELETE FROM loop_caches WHERE loop_id = ?", (loop_id,))
            return None if row is None else (row[0] or "")

        name = await self.store.write(delete)
        if name:
            await asyncio.to_thread(self._unlink, name)
        return name is not None

    def _write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()
