"""SQLite through aiosqlite: WAL, synchronous=FULL, one writer connection behind a lock (every
write is one transaction) and one reader connection so reads never wait for a write."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from .migrations import MIGRATIONS
from .models import ExperimentView, LoopConfig, LoopView, SnapshotView, Status

__all__ = ["Store"]

_EXP_COLUMNS = (
    "id, loop_id, seq, kind, description, status, reason, parent, snapshot, metric, metrics,"
    " memory_gb, exit_code, gpus, created_at, started_at, finished_at, workload_seconds, rerun_of, seed"
)


def _experiment(row: aiosqlite.Row, log_tail: str | None = None) -> ExperimentView:
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
    )


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._migrate()
        self._reader = await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        for pragma in ("synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
            await conn.execute(f"PRAGMA {pragma}")
        return conn

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

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
            await self._writer.execute("COMMIT")

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
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    async def _q(self, sql: str, args: Any = (), *, one: bool = False) -> Any:
        """Runs a read and closes its cursor: an open cursor would pin an old WAL snapshot."""
        async with self.r.execute(sql, args) as cur:
            return await cur.fetchone() if one else await cur.fetchall()

    async def ping(self) -> bool:
        try:
            await self._q("SELECT 1", one=True)
            return True
        except Exception:
            return False

    # -- snapshots ------------------------------------------------------------------------------

    @staticmethod
    async def put_snapshot(db: aiosqlite.Connection, snapshot_id: str, manifest: bytes) -> None:
        await db.execute(
            "INSERT OR IGNORE INTO snapshots (id, manifest, created_at) VALUES (?, ?, ?)",
            (snapshot_id, manifest.decode(), time.time()),
        )

    async def get_manifest(self, snapshot_id: str) -> bytes | None:
        row = await self._q("SELECT manifest FROM snapshots WHERE id = ?", (snapshot_id,), one=True)
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
            "SELECT snapshot, id, seq, metric, description, finished_at FROM experiments"
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
        row = await self._q("SELECT * FROM loops WHERE id = ?", (loop_id,), one=True)
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
            created_at=row["created_at"],
        )
        if counts:
            view.counts = await self.counts(row["id"])
        return view

    async def counts(self, loop_id: str) -> dict[str, int]:
        rows = await self._q(
            "SELECT status, COUNT(*) FROM experiments WHERE loop_id = ? GROUP BY status", (loop_id,)
        )
        counts = {s.value: 0 for s in Status}
        counts.update({r[0]: r[1] for r in rows})
        return counts

    async def list_loops(self) -> list[LoopView]:
        rows = await self._q("SELECT * FROM loops ORDER BY created_at")
        return [await self._loop_view(r, True) for r in rows]

    async def active_loop_named(self, name: str) -> str | None:
        row = await self._q("SELECT id FROM loops WHERE name = ? AND state != 'stopped'", (name,), one=True)
        return row[0] if row else None

    # -- experiments ----------------------------------------------------------------------------

    async def get_experiment(self, exp_id: str, with_tail: bool = True) -> ExperimentView | None:
        cols = _EXP_COLUMNS + (", log_tail" if with_tail else "")
        row = await self._q(f"SELECT {cols} FROM experiments WHERE id = ?", (exp_id,), one=True)
        if row is None:
            return None
        return _experiment(row, row["log_tail"] if with_tail else None)

    async def get_diff(self, exp_id: str) -> str | None:
        row = await self._q("SELECT diff FROM experiments WHERE id = ?", (exp_id,), one=True)
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
        rows = await self._q(
            f"SELECT {_EXP_COLUMNS} FROM experiments WHERE {where} ORDER BY seq LIMIT ?", args
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
        async with self.r.execute(
            "SELECT seq, status, metric, CASE WHEN status = 'keep' THEN substr(description, 1, 300) END"
            " FROM experiments WHERE loop_id = ? AND status IN ('keep', 'discard') AND metric IS NOT NULL"
            " ORDER BY seq",
            (loop_id,),
        ) as cursor:
            while rows := await cursor.fetchmany(1000):
                for row in rows:
                    yield row

    async def ledger_rows(self, loop_id: str, statuses: tuple[str, ...]) -> AsyncIterator[aiosqlite.Row]:
        """Finished experiments in finishing order, streamed (no full materialisation)."""
        marks = ",".join("?" * len(statuses))
        async with self.r.execute(
            "SELECT snapshot, status, metric, memory_gb, description FROM experiments"
            f" WHERE loop_id = ? AND finish_seq IS NOT NULL AND status IN ({marks}) ORDER BY finish_seq",
            (loop_id, *statuses),
        ) as cursor:
            while rows := await cursor.fetchmany(500):
                for row in rows:
                    yield row

    async def kept_for_history(self, loop_id: str) -> list[aiosqlite.Row]:
        """Kept experiments with their manifests, in finishing order (the loop's git history)."""
        return await self._q(
            "SELECT e.id, e.seq, e.kind, e.description, e.snapshot, e.metric, e.metrics, e.finished_at,"
            " s.manifest FROM experiments e JOIN snapshots s ON s.id = e.snapshot"
            " WHERE e.loop_id = ? AND e.status = 'keep' ORDER BY e.finish_seq",
            (loop_id,),
        )

    async def queue_heads(self, depth: int = 1) -> list[tuple[str, str]]:
        """(loop_id, experiment_id) of the `depth` oldest dispatchable queued experiments of each
        active loop: loop by loop, each loop's in the order it must run them."""
        rows = await self._q(
            """
                SELECT loop_id, id FROM (
                    SELECT e.loop_id, e.id, l.rowid AS loop_row,
                        ROW_NUMBER() OVER (PARTITION BY e.loop_id ORDER BY e.seq) AS place
                    FROM experiments e JOIN loops l ON l.id = e.loop_id
                    WHERE l.state = 'active' AND e.status = 'queued'
                      AND (e.kind = 'baseline' OR l.baseline = 'ok'))
                WHERE place <= ? ORDER BY loop_row, place
                """,
            (depth,),
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
        row = await self._q("SELECT finish_seq FROM experiments WHERE id = ?", (exp_id,), one=True)
        return row[0] if row else None

    async def best_metrics(self) -> list[tuple[str, str, float]]:
        """(loop name, metric name, best value) of every loop that has a best, oldest loop first."""
        rows = await self._q(
            "SELECT name, config, best_metric FROM loops WHERE best_metric IS NOT NULL ORDER BY created_at"
        )
        return [(r[0], msgspec.json.decode(r[1], type=LoopConfig).metric.name, r[2]) for r in rows]

    async def running_ids(self) -> list[str]:
        rows = await self._q("SELECT id FROM experiments WHERE status = 'running'")
        return [r[0] for r in rows]

    async def experiment_ids(self, loop_id: str, statuses: Iterable[str]) -> list[str]:
        statuses = list(statuses)
        rows = await self._q(
            f"SELECT id FROM experiments WHERE loop_id = ? AND status IN ({','.join('?' * len(statuses))})",
            (loop_id, *statuses),
        )
        return [r[0] for r in rows]
