"""What is read about proposals and for proposers, as Structs: one proposal, a loop's proposals,
its proposer's progress, and the context a proposer is given (the ledger, the recent experiments
with their log tails)."""

from __future__ import annotations

import time
from typing import Any

from ..models import ExperimentView, LoopView, Status
from ..proposal_models import ProposalStatus, ProposalView, ProposerView
from ..rules.ledger import LEDGER_STATUSES, header, row
from ..rules.proposals import idle_reason
from .store import Store

__all__ = [
    "get_proposal",
    "ledger_text",
    "list_proposals",
    "proposer_loops",
    "proposer_view",
    "queued_everywhere",
    "queued_proposals",
    "recent_experiments",
    "submitted",
]

_COLUMNS = (
    "id, loop_id, seq AS number, kind, status, reason, parent, description, experiment_id,"
    " duplicate_of, exit_code, attempts, requests, tokens, created_at, started_at, finished_at"
)
_STATUSES = tuple(s.value for s in ProposalStatus)


def _view(record: Any, tail: bool = False) -> ProposalView:
    fields = dict(zip(record.keys(), record, strict=True))
    fields["status"] = ProposalStatus(fields["status"])
    if not tail:
        fields.pop("log_tail", None)
    return ProposalView(**fields)


async def get_proposal(store: Store, pid: str) -> ProposalView | None:
    row_ = await store._q(
        f"SELECT {_COLUMNS}, log_tail FROM proposals WHERE id = ?", (pid,), one=True, inline=True
    )
    return _view(row_, tail=True) if row_ is not None else None


async def list_proposals(
    store: Store, loop_id: str, statuses: list[str] | None, after: int, limit: int
) -> list[ProposalView]:
    args: list[Any] = [loop_id, after]
    where = "loop_id = ? AND seq > ?"
    if statuses:
        where += f" AND status IN ({','.join('?' * len(statuses))})"
        args.extend(statuses)
    rows = await store._q(
        f"SELECT {_COLUMNS} FROM proposals WHERE {where} ORDER BY seq LIMIT ?", (*args, limit)
    )
    return [_view(r) for r in rows]


async def proposer_view(store: Store, loop: LoopView) -> ProposerView | None:
    """The loop's proposer: its proposals per status, streak, budget used, and why it idles."""
    proposer = loop.config.proposer
    if proposer is None:
        return None
    counts = dict.fromkeys(_STATUSES, 0)
    rows = await store._q(
        "SELECT status, COUNT(*) FROM proposals WHERE loop_id = ? GROUP BY status", (loop.id,)
    )
    counts.update({r[0]: r[1] for r in rows})
    state = await store._q(
        "SELECT proposer_streak, llm_requests, llm_tokens, next_seq - 1 - repeats FROM loops WHERE id = ?",
        (loop.id,),
        one=True,
    )
    submitted = state[3] + counts[ProposalStatus.running] + counts[ProposalStatus.queued]
    kind = proposer.__struct_config__.tag
    assert isinstance(kind, str)
    return ProposerView(
        kind=kind,
        counts=counts,
        failure_streak=state[0],
        requests=state[1],
        tokens=state[2],
        idle_reason=idle_reason(loop, submitted, time.time()),
    )


async def proposer_loops(store: Store) -> list[str]:
    """Ids of the loops that carry a proposer and are not stopped, oldest first."""
    rows = await store._q(
        "SELECT id FROM loops WHERE state != 'stopped' AND json_extract(config, '$.proposer') IS NOT NULL"
        " ORDER BY rowid"
    )
    return [r[0] for r in rows]


async def queued_proposals(store: Store, loop_id: str) -> list[tuple[str, str | None]]:
    """(id, parent) of the loop's queued proposals, oldest first: runs a restart cut short."""
    rows = await store._q(
        "SELECT id, parent FROM proposals WHERE loop_id = ? AND status = 'queued' ORDER BY seq", (loop_id,)
    )
    return [(r[0], r[1]) for r in rows]


async def submitted(store: Store, loop_id: str) -> int:
    """Candidates the loop has taken so far (repeat runs do not count, as for max_experiments)."""
    row = await store._q("SELECT next_seq - 1 - repeats FROM loops WHERE id = ?", (loop_id,), one=True)
    return row[0] if row else 0


async def queued_everywhere(store: Store, most: int) -> int:
    """Experiments that may start now in any loop (active; baseline succeeded or a baseline; no
    back-off pending), counted up to `most`: each takes a slot before any proposal may."""
    row = await store._q(
        "SELECT COUNT(*) FROM (SELECT 1 FROM experiments e JOIN loops l ON l.id = e.loop_id"
        " WHERE e.status = 'queued' AND l.state = 'active' AND (l.baseline = 'ok' OR e.kind = 'baseline')"
        " AND (e.not_before IS NULL OR e.not_before <= ?) LIMIT ?)",
        (time.time(), most),
        one=True,
    )
    return row[0]


async def recent_experiments(store: Store, loop_id: str, limit: int) -> list[ExperimentView]:
    """The loop's newest `limit` candidates and baselines (not repeat runs), oldest first, with
    their log tails."""
    if limit <= 0:
        return []
    rows = await store._q(
        "SELECT id FROM experiments WHERE loop_id = ? AND repeat_of IS NULL ORDER BY seq DESC LIMIT ?",
        (loop_id, limit),
    )
    found = [await store.get_experiment(r[0]) for r in reversed(rows)]
    return [e for e in found if e is not None and e.status != Status.queued]


async def ledger_text(store: Store, loop: LoopView, last: int | None = None) -> str:
    """results.tsv as the API serves it; with `last`, the header and the newest `last` rows."""
    lines: list[str] = []
    async for batch in store.ledger_rows(loop.id, LEDGER_STATUSES):
        lines.extend(row(r.snapshot, r.status, r.metric, r.memory_gb, r.description) for r in batch)
        if last is not None:
            lines = lines[-last:]
    return header(loop.config.metric.name) + "".join(lines)
