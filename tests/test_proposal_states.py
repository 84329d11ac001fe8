"""The proposal state machine on a real SQLite file: every move is guarded, a candidate is queued
only by the write that ends its proposal (never twice), failures count towards the streak that
pauses the loop, and the chat budget is counted before a request is sent."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.models import LoopConfig
from service.ops_models import WebhookEvent, WebhookSpec
from service.proposal_models import CommandProposer, ProposalStatus
from service.state import enqueue, proposals, transitions, webhooks
from service.state.proposal_reads import get_proposal
from service.state.snapshots import SnapshotStore
from service.state.store import Store

P = ProposalStatus


class Db:
    def __init__(self, tmp: Path) -> None:
        self.store = Store(tmp / "ratchet.db")
        self.snaps = SnapshotStore(tmp / "blobs")
        self.root = self.snaps.put_tree({"train.py": b"V = 1\n"})

    async def loop(self, **config: object) -> str:
        proposer = CommandProposer(command=["x"], max_failures=3)
        cfg = LoopConfig(name="p", proposer=proposer, **config)  # type: ignore[arg-type]
        loop_id, _ = await enqueue.create_loop(self.store, cfg, self.root.id, self.root.encode())
        return loop_id

    def candidate(self, text: bytes) -> proposals.Candidate:
        child = self.snaps.put_tree({"train.py": text})
        return proposals.Candidate(
            description="d", parent=self.root.id, snapshot=child.id, manifest=child.encode(), diff=""
        )

    def rows(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.store.path) as con:
            return con.execute(sql).fetchall()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    d = Db(tmp_path)
    await d.store.open()
    yield d
    await d.store.close()


async def test_a_candidate_is_queued_once_by_the_write_that_ends_its_proposal(db):
    lid = await db.loop()
    pid, number = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    assert number == 1
    cand = db.candidate(b"V = 2\n")
    moved, exp_id = await proposals.propose(db.store, pid, cand, proposals.Finished(exit_code=0))
    assert moved is P.proposed and exp_id is not None
    # the same write again (a retry, a second process) changes nothing: the proposal is over
    again, ref = await proposals.propose(db.store, pid, cand, proposals.Finished())
    assert again is P.proposed and ref is None
    assert db.rows("SELECT proposal_id FROM experiments WHERE kind = 'candidate'") == [(pid,)]
    # and the database itself refuses a second experiment of one proposal
    with pytest.raises(sqlite3.IntegrityError):
        db.rows(f"UPDATE experiments SET proposal_id = '{pid}' WHERE kind = 'baseline'")
    view = await get_proposal(db.store, pid)
    assert view is not None and view.experiment_id == exp_id and view.exit_code == 0


async def test_what_ended_stays_ended(db):
    lid = await db.loop()
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    assert await proposals.cancel(db.store, pid, "by hand")
    moved, _ = await proposals.propose(db.store, pid, db.candidate(b"V = 3\n"), proposals.Finished())
    assert moved is P.cancelled
    assert (await proposals.fail(db.store, pid, "timeout", "late", proposals.Finished())) == (False, None)
    assert not await proposals.error(db.store, pid, "engine")
    assert db.rows("SELECT COUNT(*) FROM experiments WHERE kind = 'candidate'") == [(0,)]
    with pytest.raises(proposals.TransitionRefused):  # refused before the database is touched
        proposals._move(sqlite3.connect(":memory:"), pid, P.proposed, P.running)


async def test_a_restart_requeues_running_proposals_which_start_again(db):
    lid = await db.loop()
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    assert await proposals.requeue_running(db.store) == [pid]
    assert not await proposals.requeue_running(db.store)
    assert await proposals.start(db.store, pid) and not await proposals.start(db.store, pid)
    view = await get_proposal(db.store, pid)
    assert view is not None and view.status is P.running and view.attempts == 2


async def test_a_stopped_or_full_loop_takes_no_candidate(db):
    lid = await db.loop(max_experiments=2)
    first, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    second, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    assert (await proposals.propose(db.store, first, db.candidate(b"V = 2\n"), proposals.Finished()))[
        0
    ] is P.proposed
    moved, why = await proposals.propose(db.store, second, db.candidate(b"V = 3\n"), proposals.Finished())
    assert moved is P.cancelled and "max_experiments=2" in (why or "")
    other = await db.loop()
    pid, _ = await proposals.open_proposal(db.store, other, "command", db.root.id)
    await transitions.set_loop_state(db.store, other, "stop")
    moved, why = await proposals.propose(db.store, pid, db.candidate(b"V = 4\n"), proposals.Finished())
    assert moved is P.cancelled and "stopped" in (why or "")


async def test_failures_in_a_row_pause_the_loop_and_resuming_resets_them(db):
    lid = await db.loop()
    paused = []
    for i in range(3):
        pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
        moved, why = await proposals.fail(
            db.store, pid, "exit_nonzero", f"exited with code {i}", proposals.Finished()
        )
        assert moved
        paused.append(why)
    assert paused[:2] == [None, None]
    assert paused[2] == "proposer failed 3 times in a row; last: exited with code 2"
    loop = await db.store.get_loop(lid)
    assert loop is not None and loop.state == "paused" and loop.state_reason == paused[2]
    await transitions.set_loop_state(db.store, lid, "resume")
    assert db.rows(f"SELECT state, state_reason, proposer_streak FROM loops WHERE id = '{lid}'") == [
        ("active", None, 0)
    ]
    # a candidate resets the streak; a duplicate counts like a failure
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    await proposals.fail(db.store, pid, "no_change", "no change", proposals.Finished())
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    await proposals.propose(db.store, pid, db.candidate(b"V = 5\n"), proposals.Finished())
    assert db.rows(f"SELECT proposer_streak FROM loops WHERE id = '{lid}'") == [(0,)]
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    moved, earlier = await proposals.propose(db.store, pid, db.candidate(b"V = 5\n"), proposals.Finished())
    assert moved is P.duplicate and earlier is not None
    assert db.rows(f"SELECT proposer_streak FROM loops WHERE id = '{lid}'") == [(1,)]


async def test_proposer_failures_and_the_pause_they_cause_reach_the_loops_webhooks(db):
    """Each failed proposal is a `proposer_failed` delivery, and the pause its streak causes a
    `loop_paused` one with the reason, written by the very write that fails it (a crash cannot keep
    one without the other). Duplicates count towards the streak but are not told one by one."""
    lid = await db.loop()
    events = [WebhookEvent.proposer_failed, WebhookEvent.loop_paused]
    await webhooks.add_webhooks(db.store, lid, [WebhookSpec(url="https://example.com/hook", events=events)])
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    await proposals.propose(db.store, pid, db.candidate(b"V = 6\n"), proposals.Finished())
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    moved, _ = await proposals.propose(db.store, pid, db.candidate(b"V = 6\n"), proposals.Finished())
    assert moved is P.duplicate
    for i in range(2):
        pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
        why = f"killed at its hard timeout ({i})"
        await proposals.fail(db.store, pid, "timeout", why, proposals.Finished())
    rows = db.rows(f"SELECT event, text, body FROM webhook_deliveries WHERE loop_id = '{lid}' ORDER BY rowid")
    assert [r[0] for r in rows] == ["proposer_failed", "proposer_failed", "loop_paused"]
    assert "the proposer failed: timeout: killed at its hard timeout (0)" in rows[0][1]
    reason = "proposer failed 3 times in a row; last: killed at its hard timeout (1)"
    assert f"paused ({reason}) after" in rows[2][1]
    assert json.loads(rows[2][2])["detail"] == reason
    # a failure that pauses nothing (the loop is paused already) is still told; no second pause
    pid, _ = await proposals.open_proposal(db.store, lid, "command", db.root.id)
    spent = "the request budget is spent"
    await proposals.fail(db.store, pid, "budget", spent, proposals.Finished(), pause=True)
    rows = db.rows(f"SELECT event FROM webhook_deliveries WHERE loop_id = '{lid}' ORDER BY rowid")
    assert [r[0] for r in rows] == ["proposer_failed"] * 2 + ["loop_paused", "proposer_failed"]


async def test_the_request_budget_is_counted_before_each_request(db):
    lid = await db.loop()
    pid, _ = await proposals.open_proposal(db.store, lid, "llm", db.root.id)
    assert await proposals.reserve_request(db.store, lid, pid, 2, None) is None
    await proposals.add_tokens(db.store, lid, pid, 700)
    assert await proposals.reserve_request(db.store, lid, pid, 2, 1000) is None
    assert "request budget is spent (2 of max_requests=2)" in (
        await proposals.reserve_request(db.store, lid, pid, 2, None) or ""
    )
    await proposals.add_tokens(db.store, lid, pid, 300)
    assert "token budget is spent (1000 of" in (
        await proposals.reserve_request(db.store, lid, pid, None, 1000) or ""
    )
    view = await get_proposal(db.store, pid)
    assert view is not None and (view.requests, view.tokens) == (2, 1000)
