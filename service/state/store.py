"""SQLite through aiosqlite: WAL, synchronous=FULL, one writer connection behind a lock (every
write is one transaction) and one reader connection so reads never wait for a write.

Hot writes (candidate submissions) take a second path, `write(fn)`: `fn` runs whole on a thread
of its own with a plain sqlite3 connection, and writes that arrive while one commits are committed
together, each in a savepoint (group commit: one fsync for the group, and no trip through a busy
event loop between the statements of a transaction). Both paths hold the same lock, so they never
contend for SQLite's write lock."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import msgspec

from .. import faults
from ..models import ExperimentView, LoopConfig, LoopView, SnapshotView, Status
from .migrations import MIGRATIONS

__all__ = ["Store"]

T = TypeVar("T")
_PRAGMAS = ("synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000")

_STATUSES = tuple(s.value for s in Status)
_EXP_COLUMNS = (
    "id, loop_id, seq, kind, description, status, reason, parent, snapshot, metric, metrics,"
    " memory_gb, exit_code, gpus, created_at, started_at, finished_at, workload_seconds, rerun_of, seed,"
    " repeat_of, runs, mean, attempts"
)

_LOOP_SELECT = (
    "SELECT l.*, b.runs AS best_runs FROM loops l LEFT JOIN experiments b ON b.id = l.best_experiment"
)


def _experiment(record: aiosqlite.Row, log_tail: str | None = None) -> ExperimentView:
    row = dict(zip(record.keys(), record, strict=True))  # a Row looks names up by a linear scan
    return ExperimentView(
        id=row["id"],
        loop_id=row["loop_id"],
        number=row["seq"],
        kind=row["kind"],
        description=row["description"],
        status=Status(row["status"]),
        reason=row["reason"],
        parent=row["parent"],
        snapshot=row["snapshot"],
        commit=row["snapshot"][:7],
        metric=row["metric"],
        metrics=msgspec.json.decode(row["metrics"]) if row["metrics"] else {},
        memory_gb=row["memory_gb"],
        exit_code=row["exit_code"],
        gpus=row["gpus"].split(",") if row["gpus"] else [],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        workload_seconds=row["workload_seconds"],
        log_tail=log_tail,
        rerun_of=row["rerun_of"],
        seed=row["seed"],
        repeat_of=row["repeat_of"],
        runs=row["runs"],
        mean=row["mean"],
        attempts=row["attempts"],
    )


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


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._group: sqlite3.Connection | None = None  # used only on the `_group_thread`
        self._inline: sqlite3.Connection | None = None  # reads by key, on the event loop's thread
        self._group_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ratchet-db-write")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
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
        self._pending.append((fn, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="ratchet-db-group-commit")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                async with self._lock:
                    results = await loop.run_in_executor(
                        self._group_thread, self._commit_group, [fn for fn, _ in batch]
                    )
                for (_, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

    def _commit_group(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
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
            faults.point("submit.before_commit")  # the group commit carries submissions only
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

    # -- snapshots ------------------------------------------------------------------------------

    PUT_SNAPSHOT = "INSERT OR IGNORE INTO snapshots (id, manifest, created_at) VALUES (?, ?, ?)"

    @staticmethod
    async def put_snapshot(db: aiosqlite.Connection, snapshot_id: str, manifest: bytes) -> None:
        await db.execute(Store.PUT_SNAPSHOT, (snapshot_id, manifest.decode(), time.time()))

    async def get_manifest(self, snapshot_id: str) -> bytes | None:
        row = await self._q(
            "SELECT manifest FROM snapshots WHERE id = ?", (snapshot_id,), one=True, inline=True
        )
        return row[0].encode() if row else None

    async def resolve_snapshot(self, loop_id: str, prefix: str) -> str | None:
        """A full snapshot id of this loop from an id or a unique prefix of at least 7 digits."""
        rows = await self._q(
            "SELECT DISTINCT snapshot FROM experiments"
            " WHERE loop_id = ? AND snapshot >= ? AND snapshot < ? LIMIT 2",
            (loop_id, prefix, prefix + "g"),
        )
        return rows[0][0] if len(rows) == 1 else None

    async def accepted_snapshots(self, loop_id: str) -> list[SnapshotView]:
        rows = await self._q(
            "SELECT snapshot, id, seq, COALESCE(mean, metric) AS metric, description, finished_at"
            " FROM experiments"
            " WHERE loop_id = ? AND status = 'keep' ORDER BY finish_seq DESC",
            (loop_id,),
        )
        return [
            SnapshotView(
                id=r[0],
                commit=r[0][:7],
                experiment_id=r[1],
                number=r[2],
                metric=r[3],
                description=r[4],
                finished_at=r[5],
            )
            for r in rows
        ]

    # -- loops ----------------------------------------------------------------------------------

    async def get_loop(self, loop_id: str, counts: bool = True) -> LoopView | None:
        row = await self._q(f"{_LOOP_SELECT} WHERE l.id = ?", (loop_id,), one=True, inline=True)
        if row is None:
            return None
        return await self._loop_view(row, counts)

    async def _loop_view(self, row: aiosqlite.Row, counts: bool) -> LoopView:
        view = LoopView(
            id=row["id"],
            name=row["name"],
            state=row["state"],
            baseline=row["baseline"],
            baseline_reason=row["baseline_reason"],
            config=msgspec.json.decode(row["config"], type=LoopConfig),
            root_snapshot=row["root_snapshot"],
            best_snapshot=row["best_snapshot"],
            best_metric=row["best_metric"],
            best_experiment=row["best_experiment"],
            noise_sd=row["noise_sd"],
            created_at=row["created_at"],
        )
        if row["best_experiment"] is not None:
            view.best_runs = row["best_runs"] or 1
        if counts:
            view.counts = await self.counts(row["id"])
        return view

    async def counts(self, loop_id: str) -> dict[str, int]:
        """Experiments per status, from the counters the database's triggers keep."""
        rows = await self._q("SELECT status, n FROM loop_counts WHERE loop_id = ?", (loop_id,), inline=True)
        counts = dict.fromkeys(_STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    async def list_loops(self) -> list[LoopView]:
        rows = await self._q(f"{_LOOP_SELECT} ORDER BY l.created_at")
        views = [await self._loop_view(r, False) for r in rows]
        by_loop: dict[str, dict[str, int]] = {v.id: dict.fromkeys(_STATUSES, 0) for v in views}
        for loop_id, status, n in await self._q("SELECT loop_id, status, n FROM loop_counts"):
            if loop_id in by_loop:
                by_loop[loop_id][status] = n
        for view in views:
            view.counts = by_loop[view.id]
        return views

    async def ledger_state(self, loop_id: str) -> tuple[int, int] | None:
        """(ledger revision, rows finished so far) of a loop: a cached ledger stays valid while the
        revision does, and only rows after the ones it holds need reading."""
        row = await self._q(
            "SELECT ledger_rev, finished FROM loops WHERE id = ?", (loop_id,), one=True, inline=True
        )
        return (row[0], row[1]) if row else None

    async def active_loop_named(self, name: str) -> str | None:
        row = await self._q(
            "SELECT id FROM loops WHERE name = ? AND state != 'stopped'", (name,), one=True, inline=True
        )
        return row[0] if row else None

    # -- experiments ----------------------------------------------------------------------------

    async def get_experiment(self, exp_id: str, with_tail: bool = True) -> ExperimentView | None:
        cols = _EXP_COLUMNS + (", log_tail" if with_tail else "")
        row = await self._q(f"SELECT {cols} FROM experiments WHERE id = ?", (exp_id,), one=True, inline=True)
        if row is None:
            return None
        return _experiment(row, row["log_tail"] if with_tail else None)

    async def get_diff(self, exp_id: str) -> str | None:
        row = await self._q("SELECT diff FROM experiments WHERE id = ?", (exp_id,), one=True, inline=True)
        return row[0] if row else None

    async def list_experiments(
        self, loop_id: str, statuses: Iterable[str] | None, after: int, limit: int
    ) -> list[ExperimentView]:
        args: list[Any] = [loop_id, after]
        where = "loop_id = ? AND seq > ?"
        statuses = list(statuses or [])
        if statuses:
            where += f" AND status IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        args.append(limit)
        # a page walks an index in order (one status at most): small enough to read inline
        small = len(statuses) <= 1 and limit <= 101
        rows = await self._q(
            f"SELECT {_EXP_COLUMNS} FROM experiments WHERE {where} ORDER BY seq LIMIT ?", args, inline=small
        )
        return [_experiment(r) for r in rows]

    async def latest_experiments(self, loop_id: str, limit: int) -> list[ExperimentView]:
        """The newest `limit` experiments of a loop, newest first."""
        rows = await self._q(
            f"SELECT {_EXP_COLUMNS} FROM experiments WHERE loop_id = ? ORDER BY seq DESC LIMIT ?",
            (loop_id, limit),
        )
        return [_experiment(r) for r in rows]

    async def progress_rows(self, loop_id: str) -> AsyncIterator[aiosqlite.Row]:
        """(number, status, metric, description) of kept and discarded experiments in experiment
        order, streamed; descriptions only for keeps (the chart labels only those)."""
        after = 0
        while rows := await self._q(
            "SELECT seq, status, COALESCE(mean, metric) AS metric,"
            " CASE WHEN status = 'keep' THEN substr(description, 1, 300) END FROM experiments"
            " WHERE loop_id = ? AND seq > ? AND status IN ('keep', 'discard')"
            " AND metric IS NOT NULL ORDER BY seq LIMIT 2000",
            (loop_id, after),
        ):
            for row in rows:
                yield row
            after = rows[-1][0]

    async def ledger_rows(
        self, loop_id: str, statuses: tuple[str, ...], after: int = 0, batch: int = 2000
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Batches of (finish_seq, snapshot, status, metric, memory_gb, description) of experiments
        finished after `after`, in finishing order, a page per query (no full materialisation)."""
        marks = ",".join("?" * len(statuses))
        while rows := await self._q(
            "SELECT finish_seq, snapshot, status, COALESCE(mean, metric) AS metric, memory_gb, description"
            " FROM experiments"
            f" WHERE loop_id = ? AND finish_seq > ? AND status IN ({marks}) ORDER BY finish_seq LIMIT ?",
            (loop_id, after, *statuses, batch),
        ):
            yield rows
            after = rows[-1][0]

    async def kept_for_history(self, loop_id: str) -> list[aiosqlite.Row]:
        """Kept experiments with their manifests, in finishing order (the loop's git history)."""
        return await self._q(
            "SELECT e.id, e.seq, e.kind, e.description, e.snapshot, e.metric, e.metrics, e.finished_at,"
            " s.manifest FROM experiments e JOIN snapshots s ON s.id = e.snapshot"
            " WHERE e.loop_id = ? AND e.status = 'keep' ORDER BY e.finish_seq",
            (loop_id,),
        )

    async def queue_heads(self, depth: int = 1) -> list[tuple[str, str]]:
        """(loop_id, experiment_id) of the `depth` next dispatchable queued experiments of each
        active loop: loop by loop, each loop's in the order it must run them — repeat runs
        (confirmations of a promising candidate, noise) first, then the oldest; one waiting out its
        retry back-off is not dispatchable yet."""
        rows = await self._q(
            """
                SELECT loop_id, id FROM (
                    SELECT e.loop_id, e.id, l.rowid AS loop_row,
                        ROW_NUMBER() OVER (
                            PARTITION BY e.loop_id ORDER BY e.repeat_of IS NULL, e.seq) AS place
                    FROM experiments e JOIN loops l ON l.id = e.loop_id
                    WHERE l.state = 'active' AND e.status = 'queued'
                      AND (e.kind = 'baseline' OR l.baseline = 'ok')
                      AND (e.not_before IS NULL OR e.not_before <= ?))
                WHERE place <= ? ORDER BY loop_row, place
                """,
            (time.time(), depth),
        )
        return [(r[0], r[1]) for r in rows]

    async def queue_depths(self) -> dict[str, int]:
        rows = await self._q(
            "SELECT l.name, COUNT(e.id) FROM loops l LEFT JOIN experiments e"
            " ON e.loop_id = l.id AND e.status = 'queued' GROUP BY l.name"
        )
        return {r[0]: r[1] for r in rows}

    async def finish_seq(self, exp_id: str) -> int | None:
        """The experiment's place in its loop's finishing order (1 = the loop's first result)."""
        row = await self._q(
            "SELECT finish_seq FROM experiments WHERE id = ?", (exp_id,), one=True, inline=True
        )
        return row[0] if row else None

    async def best_metrics(self) -> list[tuple[str, str, float]]:
        """(loop name, metric name, best value) of every loop that has a best, oldest loop first."""
        rows = await self._q(
            "SELECT name, config, best_metric FROM loops WHERE best_metric IS NOT NULL ORDER BY created_at"
        )
        return [(r[0], msgspec.json.decode(r[1], type=LoopConfig).metric.name, r[2]) for r in rows]

    async def attempts(self, exp_id: str) -> int:
        row = await self._q("SELECT attempts FROM experiments WHERE id = ?", (exp_id,), one=True)
        return row[0] if row else 0

    async def quick_check(self) -> list[str]:
        """SQLite's own consistency check of the database file; empty when it is sound."""
        rows = await self._q("PRAGMA quick_check")
        found = [r[0] for r in rows]
        return [] if found == ["ok"] else found

    async def snapshot_refs(self) -> list[aiosqlite.Row]:
        """Every stored snapshot with its manifest, and the names of the loops whose root or best it
        is (NULL for the others)."""
        return await self._q(
            "SELECT s.id, s.manifest, (SELECT group_concat(l.name, ', ') FROM loops l"
            " WHERE l.best_snapshot = s.id OR l.root_snapshot = s.id) AS loops FROM snapshots s"
        )

    async def running_ids(self) -> list[str]:
        rows = await self._q("SELECT id FROM experiments WHERE status = 'running'")
        return [r[0] for r in rows]

    async def experiment_ids(self, loop_id: str, statuses: Iterable[str]) -> list[str]:
        return await self._ids("loop_id", loop_id, statuses)

    async def repeat_ids(self, primary_id: str, statuses: Iterable[str]) -> list[str]:
        return await self._ids("repeat_of", primary_id, statuses)

    async def _ids(
        self, column: Literal["loop_id", "repeat_of"], value: str, statuses: Iterable[str]
    ) -> list[str]:
        statuses = list(statuses)
        rows = await self._q(
            f"SELECT id FROM experiments WHERE {column} = ? AND status IN ({','.join('?' * len(statuses))})",
            (value, *statuses),
        )
        return [r[0] for r in rows]

    async def loops_with_best(self) -> list[tuple[str, LoopConfig]]:
        """(id, config) of the active loops that have a best: the ones an idle slot may re-measure."""
        rows = await self._q(
            "SELECT id, config FROM loops WHERE state = 'active' AND best_experiment IS NOT NULL"
            " ORDER BY created_at"
        )
        return [(r[0], msgspec.json.decode(r[1], type=LoopConfig)) for r in rows]
