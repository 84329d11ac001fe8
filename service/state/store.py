"""What the service reads from its database, as Structs: no raw row leaves this module.

The connections, transactions and the group commit are `Database`'s (`database.py`); the writes
that change an experiment's status are `transitions`'. A loop's config is stored as JSON and
decoded by `loop_config` alone, once per distinct text (configs never change once stored).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import aiosqlite
import msgspec

from ..models import CacheView, ExperimentView, LoopConfig, LoopView, SnapshotView, Status
from .database import Database
from .history import HistoryCommit

__all__ = ["LedgerRow", "ProgressRow", "SnapshotRef", "Store", "loop_config"]

_STATUSES = tuple(s.value for s in Status)
# Named after ExperimentView's fields: a row becomes one by name, with three columns decoded.
_EXP_COLUMNS = (
    "id, loop_id, seq AS number, kind, description, status, reason, parent, snapshot,"
    ' substr(snapshot, 1, 7) AS "commit", metric, metrics, memory_gb, exit_code, gpus, created_at,'
    " started_at, finished_at, workload_seconds, rerun_of, seed, repeat_of, runs, mean, attempts, node,"
    " proposal_id"
)
_LOOP_SELECT = (
    "SELECT l.id, l.name, l.state, l.baseline, l.baseline_reason, l.config, l.root_snapshot,"
    " l.best_snapshot, l.best_metric, l.best_experiment, l.noise_sd, l.created_at, l.state_reason,"
    " CASE WHEN l.best_experiment IS NOT NULL THEN MAX(COALESCE(b.runs, 1), 1) END AS best_runs,"
    " c.state AS cache_state, c.bytes AS cache_bytes, c.files AS cache_files,"
    " c.experiment AS cache_experiment, c.filled_at AS cache_filled_at"
    " FROM loops l LEFT JOIN experiments b ON b.id = l.best_experiment"
    " LEFT JOIN loop_caches c ON c.loop_id = l.id"
)


@functools.lru_cache(maxsize=4096)
def loop_config(raw: str) -> LoopConfig:
    """A stored loop config. Frozen, so one decoded copy serves every read of it."""
    return msgspec.json.decode(raw, type=LoopConfig)


def _fields(record: aiosqlite.Row) -> dict[str, Any]:
    return dict(zip(record.keys(), record, strict=True))  # a Row looks names up by a linear scan


def _experiment(record: aiosqlite.Row) -> ExperimentView:
    row = _fields(record)
    row["status"] = Status(row["status"])
    row["metrics"] = msgspec.json.decode(row["metrics"]) if row["metrics"] else {}
    row["gpus"] = row["gpus"].split(",") if row["gpus"] else []
    return ExperimentView(**row)


def _loop(record: aiosqlite.Row) -> LoopView:
    row = _fields(record)
    row["config"] = loop_config(row["config"])
    cache = {k[len("cache_") :]: row.pop(k) for k in list(row) if k.startswith("cache_")}
    row["cache"] = CacheView(**cache) if cache["state"] is not None else None
    return LoopView(**row)


class ProgressRow(msgspec.Struct, frozen=True):
    number: int
    status: str
    metric: float
    description: str | None  # kept ones only: the chart labels only those


class LedgerRow(msgspec.Struct, frozen=True):
    finish_seq: int
    snapshot: str
    status: str
    metric: float | None
    memory_gb: float | None
    description: str


class SnapshotRef(msgspec.Struct, frozen=True):
    id: str
    manifest: str
    loops: str | None  # names of the loops whose root or best it is


class Store(Database):
    # -- snapshots ------------------------------------------------------------------------------

    PUT_SNAPSHOT = "INSERT OR IGNORE INTO snapshots (id, manifest, created_at) VALUES (?, ?, ?)"

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
            'SELECT snapshot AS id, substr(snapshot, 1, 7) AS "commit", id AS experiment_id, seq AS number,'
            " COALESCE(mean, metric) AS metric, description, finished_at FROM experiments"
            " WHERE loop_id = ? AND status = 'keep' ORDER BY finish_seq DESC",
            (loop_id,),
        )
        return [SnapshotView(**_fields(r)) for r in rows]

    async def snapshot_refs(self) -> list[SnapshotRef]:
        """Every stored snapshot with its manifest, and the names of the loops whose root or best it
        is (None for the others)."""
        rows = await self._q(
            "SELECT s.id, s.manifest, (SELECT group_concat(l.name, ', ') FROM loops l"
            " WHERE l.best_snapshot = s.id OR l.root_snapshot = s.id) AS loops FROM snapshots s"
        )
        return [SnapshotRef(*r) for r in rows]

    # -- loops ----------------------------------------------------------------------------------

    async def get_loop(self, loop_id: str, counts: bool = True) -> LoopView | None:
        row = await self._q(f"{_LOOP_SELECT} WHERE l.id = ?", (loop_id,), one=True, inline=True)
        if row is None:
            return None
        view = _loop(row)
        if counts:
            view.counts = await self.counts(loop_id)
        return view

    async def cache_file(self, loop_id: str) -> str | None:
        """The file name of the loop's stored cache (see `state.caches`), if it has one."""
        row = await self._q(
            "SELECT file FROM loop_caches WHERE loop_id = ? AND state = 'filled'", (loop_id,), one=True
        )
        return row[0] if row else None

    async def counts(self, loop_id: str) -> dict[str, int]:
        """Experiments per status, from the counters the database's triggers keep."""
        rows = await self._q("SELECT status, n FROM loop_counts WHERE loop_id = ?", (loop_id,), inline=True)
        counts = dict.fromkeys(_STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    async def list_loops(self) -> list[LoopView]:
        views = [_loop(r) for r in await self._q(f"{_LOOP_SELECT} ORDER BY l.created_at")]
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

    async def best_metrics(self) -> list[tuple[str, str, float]]:
        """(loop name, metric name, best value) of every loop that has a best, oldest loop first."""
        rows = await self._q(
            "SELECT name, config, best_metric FROM loops WHERE best_metric IS NOT NULL ORDER BY created_at"
        )
        return [(r[0], loop_config(r[1]).metric.name, r[2]) for r in rows]

    async def loops_with_best(self) -> list[tuple[str, LoopConfig]]:
        """(id, config) of the active loops that have a best: the ones an idle slot may re-measure."""
        rows = await self._q(
            "SELECT id, config FROM loops WHERE state = 'active' AND best_experiment IS NOT NULL"
            " ORDER BY created_at"
        )
        return [(r[0], loop_config(r[1])) for r in rows]

    # -- experiments ----------------------------------------------------------------------------

    async def get_experiment(self, exp_id: str, with_tail: bool = True) -> ExperimentView | None:
        cols = _EXP_COLUMNS + (", log_tail" if with_tail else "")
        row = await self._q(f"SELECT {cols} FROM experiments WHERE id = ?", (exp_id,), one=True, inline=True)
        return _experiment(row) if row is not None else None

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

    async def progress_rows(self, loop_id: str) -> AsyncIterator[ProgressRow]:
        """Kept and discarded experiments in experiment order, streamed."""
        after = 0
        while rows := await self._q(
            "SELECT seq, status, COALESCE(mean, metric) AS metric,"
            " CASE WHEN status = 'keep' THEN substr(description, 1, 300) END FROM experiments"
            " WHERE loop_id = ? AND seq > ? AND status IN ('keep', 'discard')"
            " AND metric IS NOT NULL ORDER BY seq LIMIT 2000",
            (loop_id, after),
        ):
            for row in rows:
                yield ProgressRow(*row)
            after = rows[-1][0]

    async def ledger_rows(
        self, loop_id: str, statuses: Iterable[str], after: int = 0, batch: int = 2000
    ) -> AsyncIterator[list[LedgerRow]]:
        """Batches of the experiments finished after `after`, in finishing order, a page per query
        (no full materialisation)."""
        statuses = tuple(statuses)
        marks = ",".join("?" * len(statuses))
        while rows := await self._q(
            "SELECT finish_seq, snapshot, status, COALESCE(mean, metric) AS metric, memory_gb, description"
            " FROM experiments"
            f" WHERE loop_id = ? AND finish_seq > ? AND status IN ({marks}) ORDER BY finish_seq LIMIT ?",
            (loop_id, after, *statuses, batch),
        ):
            yield [LedgerRow(*r) for r in rows]
            after = rows[-1][0]

    async def kept_for_history(self, loop_id: str) -> list[HistoryCommit]:
        """Kept experiments with their manifests, in finishing order (the loop's git history)."""
        rows = await self._q(
            "SELECT e.id, e.description, e.snapshot, s.manifest, e.metrics, e.finished_at"
            " FROM experiments e JOIN snapshots s ON s.id = e.snapshot"
            " WHERE e.loop_id = ? AND e.status = 'keep' ORDER BY e.finish_seq",
            (loop_id,),
        )
        return [
            HistoryCommit(
                experiment=r[0],
                description=r[1],
                snapshot=r[2],
                manifest=r[3],
                metrics=msgspec.json.decode(r[4]) if r[4] else {},
                finished_at=r[5],
            )
            for r in rows
        ]

    async def active_loops(self) -> list[tuple[str, bool]]:
        """(id, whether its baseline succeeded) of every active loop, oldest first."""
        rows = await self._q("SELECT id, baseline = 'ok' FROM loops WHERE state = 'active' ORDER BY rowid")
        return [(r[0], bool(r[1])) for r in rows]

    async def queue_head(self, loop_id: str, baseline_ok: bool, depth: int) -> list[str]:
        """The `depth` next dispatchable queued experiments of a loop, in the order it must run
        them: repeat runs (confirmations of a promising candidate, noise) first, then the oldest.
        Before its baseline succeeded only baselines are; one waiting out its retry back-off is
        not yet. Reads `depth` entries of an index, however long the queue."""
        rows = await self._q(
            "SELECT id FROM experiments INDEXED BY experiments_queue_order"
            " WHERE loop_id = ? AND status = 'queued' AND (kind = 'baseline' OR ?)"
            " AND (not_before IS NULL OR not_before <= ?) ORDER BY repeat_of IS NULL, seq LIMIT ?",
            (loop_id, baseline_ok, time.time(), depth),
            inline=True,
        )
        return [r[0] for r in rows]

    async def queue_depths(self) -> dict[str, int]:
        """Queued experiments per loop name, from the counters the database's triggers keep."""
        rows = await self._q(
            "SELECT l.name, COALESCE(SUM(c.n), 0) FROM loops l LEFT JOIN loop_counts c"
            " ON c.loop_id = l.id AND c.status = 'queued' GROUP BY l.name"
        )
        return {r[0]: r[1] for r in rows}

    async def finish_seq(self, exp_id: str) -> int | None:
        """The experiment's place in its loop's finishing order (1 = the loop's first result)."""
        row = await self._q(
            "SELECT finish_seq FROM experiments WHERE id = ?", (exp_id,), one=True, inline=True
        )
        return row[0] if row else None

    async def attempts(self, exp_id: str) -> int:
        row = await self._q("SELECT attempts FROM experiments WHERE id = ?", (exp_id,), one=True)
        return row[0] if row else 0

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
