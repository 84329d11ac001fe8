"""SQLite: WAL, synchronous=FULL, writes behind one lock, and reader connections so reads never
wait for a write.

Every change of state (a submission, a status transition) is `write(fn)`: `fn` runs whole on a
thread of its own with a plain sqlite3 connection, and writes that arrive while one commits are
committed together, each in a savepoint (group commit: one fsync for the group, and no trip
through a busy event loop between the statements of a transaction). The few other writes
(migrations, tokens) take `tx()` on an aiosqlite connection. Both paths hold the same lock, so
they never contend for SQLite's write lock."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .. import faults
from .migrations import MIGRATIONS

__all__ = ["Database", "fetch"]

T = TypeVar("T")
_PRAGMAS = ("synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000")


def fetch(db: sqlite3.Connection, sql: str, args: Any = (), *, first: bool = False) -> Any:
    """Rows of a read inside a write (the first one, or None, with `first`)."""
    rows = db.execute(sql, args).fetchall()
    return (rows[0] if rows else None) if first else rows


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration; a `;` inside a trigger body does not end one."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"incomplete statement in a migration: {pending!r}")


class Database:
    """The connections and the two ways to write; `Store` adds what is read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._group: sqlite3.Connection | None = None  # used only on the `_group_thread`
        self._inline: sqlite3.Connection | None = None  # reads by key, on the event loop's thread
        self._group_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ratchet-db-write")
        # (write, its caller's future, its fault scope: see `faults.scope`)
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], str]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._migrate()
        self._reader = await self._connect()
        self._inline = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._inline.row_factory = sqlite3.Row
        self._inline.execute("PRAGMA busy_timeout=0")  # never block the event loop; see `_q`
        loop = asyncio.get_running_loop()
        self._group = await loop.run_in_executor(self._group_thread, self._connect_group)

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        for pragma in _PRAGMAS:
            await conn.execute(f"PRAGMA {pragma}")
        return conn

    def _connect_group(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        return conn

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._group is not None:
            await asyncio.get_running_loop().run_in_executor(self._group_thread, self._group.close)
        self._group_thread.shutdown(wait=True)
        if self._inline is not None:
            self._inline.close()
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = self._group = self._inline = None

    @property
    def r(self) -> aiosqlite.Connection:
        assert self._reader is not None, "store is not open"
        return self._reader

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolled back on any exception, committed (fsynced) otherwise."""
        assert self._writer is not None, "store is not open"
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            faults.scoped_point("before_commit")
            await self._writer.execute("COMMIT")

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn(connection)` inside a write transaction and returns its result once committed
        (fsynced). An exception from `fn` rolls back only what `fn` wrote and is raised here. The
        write happens even if the caller is cancelled meanwhile."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future, faults.current_scope()))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="ratchet-db-group-commit")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                fns, scopes = [fn for fn, _, _ in batch], {scope for _, _, scope in batch}
                async with self._lock:
                    results = await loop.run_in_executor(self._group_thread, self._commit_group, fns, scopes)
                for (_, future, _), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

    def _commit_group(
        self, fns: list[Callable[[sqlite3.Connection], Any]], scopes: set[str]
    ) -> list[tuple[bool, Any]]:
        """On the group thread: one transaction, a savepoint per write, one commit."""
        db = self._group
        assert db is not None, "store is not open"
        out: list[tuple[bool, Any]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn in fns:
                db.execute("SAVEPOINT one_write")
                try:
                    out.append((True, fn(db)))
                except Exception as exc:
                    db.execute("ROLLBACK TO one_write")
                    out.append((False, exc))
                db.execute("RELEASE one_write")
            for scope in sorted(scopes - {""}):
                faults.point(f"{scope}.before_commit")
            db.execute("COMMIT")
        except Exception as exc:  # the transaction itself failed (disk full, I/O error): none stands
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(False, exc)] * len(fns)
        return out

    async def _migrate(self) -> None:
        async with self.tx() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = (await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))[0]
            current = row[0] or 0
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"database schema version {current} is newer than this Ratchet ({len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in _statements(MIGRATIONS[version - 1]):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    async def _q(self, sql: str, args: Any = (), *, one: bool = False, inline: bool = False) -> Any:
        """Runs a read to its end in one call. No statement stays open between calls: one would
        hold a read transaction on the shared reader, and every other request's read would see
        that old WAL snapshot (a row just committed would be missing).

        `inline`: a lookup by key, run right here on the event loop: it takes tens of microseconds,
        less than the two thread switches of a trip to the reader's thread. A WAL reader never waits
        for the writer; should SQLite still say busy, the read goes to the reader's thread."""
        rows = None
        if inline and self._inline is not None:
            with contextlib.suppress(sqlite3.OperationalError):
                rows = self._inline.execute(sql, args).fetchall()
        if rows is None:
            rows = await self.r.execute_fetchall(sql, args)
        return (rows[0] if rows else None) if one else rows

    async def ping(self) -> bool:
        try:
            await self._q("SELECT 1", one=True)
            return True
        except Exception:
            return False

    async def quick_check(self) -> list[str]:
        """SQLite's own consistency check of the database file; empty when it is sound."""
        rows = await self._q("PRAGMA quick_check")
        found = [r[0] for r in rows]
        return [] if found == ["ok"] else found
