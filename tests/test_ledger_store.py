"""The ledger and the counts per status at the database level (real SQLite files): counters kept by
triggers match the experiments, old databases are migrated and back-filled, and the cached
`results.tsv` rows equal a ledger built from scratch, also after a row in it changed."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

from service.models import LoopConfig, Status
from service.rules.decisions import Outcome
from service.rules.ledger import LEDGER_STATUSES, row
from service.state import enqueue, transitions
from service.state.ledger_cache import LedgerCache
from service.state.migrations import MIGRATIONS
from service.state.snapshots import SnapshotStore
from service.state.store import Store

CONFIG = LoopConfig(name="l", command=["python3", "train.py"])


async def open_store(tmp_path: Path) -> tuple[Store, str, str]:
    store = Store(tmp_path / "ratchet.db")
    await store.open()
    root = SnapshotStore(tmp_path / "blobs").put_tree({"train.py": b"V = 1\n"})
    loop_id, _ = await enqueue.create_loop(store, CONFIG, root.id, root.encode())
    return store, loop_id, root.id


async def run(store: Store, exp_id: str, metric: float | None, exit_code: int = 0) -> None:
    assert await transitions.start(store, exp_id, [])
    info = transitions.Finished(metrics={}, memory_gb=1.0, workload_seconds=1.0, log_tail="")
    await transitions.finish(store, exp_id, Outcome(exit_code=exit_code, metric=metric), info)


async def submit(store: Store, loop_id: str, snap: str, description: str) -> str:
    """A candidate on `snap` with a snapshot of its own (one that already ran would be a duplicate)."""
    child = hashlib.sha256(f"{loop_id} {description} {uuid.uuid4()}".encode()).hexdigest()
    return await enqueue.submit(store, loop_id, description, snap, child, b'{"files":[]}', "")


def truth(db: Path, loop_id: str) -> dict[str, int]:
    counts = {s.value: 0 for s in Status}
    with sqlite3.connect(db) as con:
        q = "SELECT status, COUNT(*) FROM experiments WHERE loop_id = ? GROUP BY status"
        counts.update(dict(con.execute(q, (loop_id,)).fetchall()))
    return counts


def fresh_ledger(db: Path, loop_id: str) -> bytes:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT snapshot, status, metric, memory_gb, description FROM experiments"
            f" WHERE loop_id = ? AND finish_seq IS NOT NULL AND status IN {LEDGER_STATUSES!r}"
            " ORDER BY finish_seq",
            (loop_id,),
        ).fetchall()
    return "".join(row(*r) for r in rows).encode()


async def test_counts_follow_every_transition(tmp_path):
    store, loop_id, snap = await open_store(tmp_path)
    try:
        db = tmp_path / "ratchet.db"
        assert (await store.counts(loop_id)) == truth(db, loop_id) and truth(db, loop_id)["queued"] == 1
        baseline = (await store.list_experiments(loop_id, None, 0, 10))[0].id
        await run(store, baseline, 1.0)
        ids = [await submit(store, loop_id, snap, f"c{i}") for i in range(5)]
        await run(store, ids[0], 0.5)  # keep
        await run(store, ids[1], 2.0)  # discard
        await run(store, ids[2], None, exit_code=1)  # crash
        await transitions.cancel(store, ids[3])
        assert await transitions.start(store, ids[4], [])
        counts = await store.counts(loop_id)
        assert counts == truth(db, loop_id)
        assert (counts["keep"], counts["discard"], counts["crash"], counts["cancelled"]) == (2, 1, 1, 1)
        assert counts["running"] == 1 and counts["queued"] == 0
        await transitions.set_loop_state(store, loop_id, "stop")
        assert await store.counts(loop_id) == truth(db, loop_id)
        listed = await store.list_loops()
        assert [v.counts for v in listed] == [truth(db, loop_id)]
    finally:
        await store.close()


async def test_migration_backfills_counts_of_an_older_database(tmp_path):
    db = tmp_path / "ratchet.db"
    with sqlite3.connect(db) as con:  # a database as the previous schema left it
        con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, script in enumerate(MIGRATIONS[:2], start=1):
            con.executescript(script)
            con.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        con.execute("INSERT INTO snapshots VALUES ('s', '{}', 0)")
        con.execute("INSERT INTO loops (id, name, config, state, root_snapshot, created_at) VALUES"
                    " ('l1', 'l', '{}', 'active', 's', 0)")  # fmt: skip
        for seq, status in enumerate(["keep", "discard", "discard", "queued"], start=1):
            con.execute(
                "INSERT INTO experiments (id, loop_id, seq, kind, description, snapshot, status, created_at)"
                " VALUES (?, 'l1', ?, 'candidate', 'x', 's', ?, 0)",
                (f"e{seq}", seq, status),
            )
    store = Store(db)
    await store.open()
    try:
        counts = await store.counts("l1")
        assert counts == truth(db, "l1") and counts["discard"] == 2 and counts["keep"] == 1
    finally:
        await store.close()


async def test_cached_ledger_appends_and_rebuilds_when_a_row_changes(tmp_path):
    store, loop_id, snap = await open_store(tmp_path)
    db = tmp_path / "ratchet.db"
    cache = LedgerCache(store)

    async def served() -> bytes:
        return b"".join([part async for part in cache.rows(loop_id)])

    try:
        assert await served() == b""
        baseline = (await store.list_experiments(loop_id, None, 0, 10))[0].id
        await run(store, baseline, 1.0)
        assert await served() == fresh_ledger(db, loop_id) != b""
        for i in range(70):  # more appends than the cache keeps as separate parts
            exp = await submit(store, loop_id, snap, f"try\t{i}")
            await run(store, exp, 1.0 - i / 100 if i % 3 else None, exit_code=0 if i % 3 else 1)
            assert await served() == fresh_ledger(db, loop_id)
        # a row already served changes (e.g. a later re-judgement): the cache must not serve the old one
        with sqlite3.connect(db) as con:
            con.execute("UPDATE experiments SET description = 'rewritten' WHERE id = ?", (baseline,))
        assert b"rewritten" in await served()
        assert await served() == fresh_ledger(db, loop_id)
    finally:
        await store.close()
