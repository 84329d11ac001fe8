"""Webhooks and their deliveries in the database.

Events become delivery rows (`pending`) before anything is sent, so a delivery survives a
restart; the sender (`runs.webhook_sender`) posts the due ones and writes each attempt's outcome.

Events about results (keep, crash and timeout streaks, a loop that ran out of `max_experiments`)
are read from the ledger, not pushed by the code that decides: `scan` turns every loop's results
after its cursor (`webhook_cursors.seen`, a `finish_seq`) into deliveries and moves the cursor in
the same transaction. Whatever path decided an experiment (a verdict, a confirmation settling it),
and even when the service died right after deciding, each result is seen exactly once. Events that
are not results (a pause, a stop, a proposer failure) are written by `emit` where they happen.

One delivery per webhook and dedupe key (`UNIQUE`): an event derived twice is delivered once.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import msgspec

from ..ops_models import DeliveryPage, DeliveryState, DeliveryView, WebhookEvent, WebhookSpec, WebhookView
from ..rules.webhooks import LedgerResult, LoopFacts, ledger_events, message, target_of
from .database import fetch
from .store import Store, loop_config

__all__ = [
    "SERVICE_HOOK",
    "Due",
    "add_webhooks",
    "delete_webhook",
    "due",
    "emit",
    "emit_in",
    "get_delivery",
    "list_deliveries",
    "list_webhooks",
    "loop_failures",
    "new_results",
    "proposer_failed",
    "record_attempt",
    "redeliver",
    "scan",
    "set_service_hook",
]

SERVICE_HOOK = "service"  # the id of the webhook of RATCHET_WEBHOOK_URL
SCAN_BATCH = 500  # results of one loop turned into events per transaction


class Due(msgspec.Struct, frozen=True):
    """A delivery whose next attempt is due, with what sending it needs."""

    id: str
    url: str
    secret: str
    event: str
    body: bytes
    attempts: int


class _Hook(msgspec.Struct, frozen=True):
    id: str
    events: frozenset[str]
    streak: int


def _new_id() -> str:
    return secrets.token_hex(8)


# -- webhooks ---------------------------------------------------------------------------------------


def _insert_hook(db: sqlite3.Connection, hook_id: str, loop_id: str | None, spec: WebhookSpec) -> None:
    db.execute(
        "INSERT INTO webhooks (id, loop_id, url, secret, events, streak, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            hook_id,
            loop_id,
            spec.url,
            spec.secret or secrets.token_urlsafe(32),
            ",".join(dict.fromkeys(e.value for e in spec.events)),
            spec.streak,
            time.time(),
        ),
    )


async def add_webhooks(store: Store, loop_id: str, specs: list[WebhookSpec]) -> list[str]:
    ids = [_new_id() for _ in specs]

    def write(db: sqlite3.Connection) -> None:
        for hook_id, spec in zip(ids, specs, strict=True):
            _insert_hook(db, hook_id, loop_id, spec)

    await store.write(write)
    return ids


async def set_service_hook(store: Store, spec: WebhookSpec | None) -> None:
    """The service-wide webhook as the settings say now (None: there is none). A new one starts
    with the results to come, not the history."""

    def write(db: sqlite3.Connection) -> None:
        old = fetch(
            db, "SELECT url, secret, events, streak FROM webhooks WHERE id = ?", (SERVICE_HOOK,), first=True
        )
        if spec is None:
            db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (SERVICE_HOOK,))
            db.execute("DELETE FROM webhooks WHERE id = ?", (SERVICE_HOOK,))
            return
        if old is None:
            _catch_up_cursors(db)
        db.execute("DELETE FROM webhooks WHERE id = ?", (SERVICE_HOOK,))
        _insert_hook(db, SERVICE_HOOK, None, spec)

    await store.write(write)


def _catch_up_cursors(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO webhook_cursors (loop_id, seen) SELECT id, finished FROM loops WHERE true"
        " ON CONFLICT (loop_id) DO UPDATE SET seen = excluded.seen"
    )


async def delete_webhook(store: Store, hook_id: str) -> bool:
    def write(db: sqlite3.Connection) -> bool:
        db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (hook_id,))
        return db.execute("DELETE FROM webhooks WHERE id = ?", (hook_id,)).rowcount == 1

    return await store.write(write)


def _hooks_for(db: sqlite3.Connection, loop_id: str) -> list[_Hook]:
    rows = fetch(
        db, "SELECT id, events, streak FROM webhooks WHERE loop_id = ? OR loop_id IS NULL", (loop_id,)
    )
    return [_Hook(r["id"], frozenset(r["events"].split(",")), r["streak"]) for r in rows]


# -- events -> deliveries -----------------------------------------------------------------------------


def _facts(loop: sqlite3.Row) -> LoopFacts:
    metric = loop_config(loop["config"]).metric
    return LoopFacts(
        id=loop["id"],
        name=loop["name"],
        state=loop["state"],
        metric=metric.name,
        direction=metric.direction,
        best_metric=loop["best_metric"],
        finished=loop["finished"],
    )


def _deliver(
    db: sqlite3.Connection,
    hook: _Hook,
    facts: LoopFacts,
    event: WebhookEvent,
    dedupe: str,
    **parts: Any,
) -> None:
    if event.value not in hook.events:
        return
    now = time.time()
    delivery_id = _new_id()
    body = message(delivery_id, event, now, facts, **parts)
    text = msgspec.json.decode(body)["text"]
    db.execute(
        "INSERT OR IGNORE INTO webhook_deliveries (id, webhook_id, loop_id, event, dedupe, body, text, state,"
        " next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
        (delivery_id, hook.id, facts.id, event.value, dedupe, body, text, now, now),
    )


async def new_results(store: Store) -> bool:
    """Whether some loop has results its webhooks have not seen yet (a cheap read, every tick)."""
    rows = await store.r.execute_fetchall(
        "SELECT 1 FROM loops l LEFT JOIN webhook_cursors c ON c.loop_id = l.id"
        " WHERE l.finished > COALESCE(c.seen, 0) LIMIT 1"
    )
    return bool(rows)


async def scan(store: Store) -> int:
    """Turns new results into deliveries and moves the cursors; returns the deliveries made."""
    return await store.write(_scan)


def _scan(db: sqlite3.Connection) -> int:
    loops = fetch(
        db,
        "SELECT l.*, COALESCE(c.seen, 0) AS seen FROM loops l LEFT JOIN webhook_cursors c"
        " ON c.loop_id = l.id WHERE l.finished > COALESCE(c.seen, 0)",
    )
    made = 0
    for loop in loops:
        seen, upto = loop["seen"], min(loop["finished"], loop["seen"] + SCAN_BATCH)
        hooks = _hooks_for(db, loop["id"])
        if hooks:
            made += _result_events(db, loop, hooks, seen, upto)
            if upto == loop["finished"]:
                made += _ran_out(db, loop, hooks)
        db.execute(
            "INSERT INTO webhook_cursors (loop_id, seen) VALUES (?, ?)"
            " ON CONFLICT (loop_id) DO UPDATE SET seen = excluded.seen",
            (loop["id"], upto),
        )
    return made


def _result_events(
    db: sqlite3.Connection, loop: sqlite3.Row, hooks: list[_Hook], seen: int, upto: int
) -> int:
    longest = max(h.streak for h in hooks)
    rows = [
        LedgerResult(*r)
        for r in fetch(
            db,
            "SELECT finish_seq, id, seq, kind, status, COALESCE(mean, metric), description, reason, snapshot"
            " FROM experiments WHERE loop_id = ? AND finish_seq > ? AND finish_seq <= ? ORDER BY finish_seq",
            (loop["id"], max(0, seen - longest), upto),
        )
    ]
    facts = _facts(loop)
    made = 0
    for hook in hooks:
        for event in ledger_events(rows, seen, hook.streak, (WebhookEvent(e) for e in hook.events)):
            _deliver(db, hook, facts, event.event, event.dedupe, result=event.result, streak=event.streak)
            made += 1
    return made


def _ran_out(db: sqlite3.Connection, loop: sqlite3.Row, hooks: list[_Hook]) -> int:
    """A loop at `max_experiments` with nothing left to run or confirm has finished."""
    limit = loop_config(loop["config"]).max_experiments
    submitted = loop["next_seq"] - 1 - loop["repeats"]
    if limit is None or submitted < limit or loop["state"] == "stopped":
        return 0
    busy = fetch(
        db,
        "SELECT COALESCE(SUM(n), 0) FROM loop_counts WHERE loop_id = ?"
        " AND status IN ('queued', 'running', 'confirming')",
        (loop["id"],),
        first=True,
    )[0]
    if busy:
        return 0
    facts = _facts(loop)
    for hook in hooks:
        detail = f"max_experiments={limit} reached"
        _deliver(db, hook, facts, WebhookEvent.loop_finished, "loop_finished", detail=detail)
    return len(hooks)


async def emit(
    store: Store, loop_id: str, event: WebhookEvent, detail: str | None, dedupe: str | None = None
) -> None:
    """An event that is not a result (pause, stop, a proposer failure) for every webhook of the
    loop that wants it. `dedupe`: at most one delivery per webhook with this key (default: every
    call is an event of its own)."""
    await store.write(lambda db: emit_in(db, loop_id, event, detail, dedupe))


def emit_in(
    db: sqlite3.Connection, loop_id: str, event: WebhookEvent, detail: str | None, dedupe: str | None = None
) -> None:
    """`emit` inside a write already under way: the event is committed with the change it tells of
    (a loop paused by its proposer's failures), or not at all."""
    key = dedupe or f"{event.value}:{_new_id()}"
    loop = fetch(db, "SELECT * FROM loops WHERE id = ?", (loop_id,), first=True)
    if loop is None:
        return
    facts = _facts(loop)
    for hook in _hooks_for(db, loop_id):
        _deliver(db, hook, facts, event, key, detail=detail)


async def proposer_failed(store: Store, loop_id: str, reason: str) -> None:
    """The hook point for proposers: call it when a loop's proposer fails to make a candidate
    (`reason` says how, in a line). Every webhook of the loop that wants `proposer_failed` gets it."""
    await emit(store, loop_id, WebhookEvent.proposer_failed, reason)


# -- sending ----------------------------------------------------------------------------------------------


async def due(store: Store, now: float, limit: int, busy: set[str]) -> list[Due]:
    """Pending deliveries whose attempt is due, oldest first, leaving out those being sent."""
    rows = await store.r.execute_fetchall(
        "SELECT d.id, h.url, h.secret, d.event, d.body, d.attempts FROM webhook_deliveries d"
        " JOIN webhooks h ON h.id = d.webhook_id WHERE d.state = 'pending' AND d.next_at <= ?"
        " ORDER BY d.next_at LIMIT ?",
        (now, limit + len(busy)),
    )
    return [Due(*r) for r in rows if r[0] not in busy][:limit]


async def record_attempt(
    store: Store,
    delivery_id: str,
    state: DeliveryState,
    status: int | None,
    error: str | None,
    next_at: float | None,
) -> None:
    """One attempt's outcome: `delivered`, `failed` (final), or `pending` again at `next_at`."""

    def write(db: sqlite3.Connection) -> None:
        finished = None if state == DeliveryState.pending else time.time()
        db.execute(
            "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, last_status = ?,"
            " last_error = ?, next_at = ?, finished_at = ? WHERE id = ? AND state = 'pending'",
            (state.value, status, error[:500] if error else None, next_at, finished, delivery_id),
        )

    await store.write(write)


async def redeliver(store: Store, delivery_id: str) -> bool:
    """A failed delivery is tried again now, with a fresh count of attempts."""

    def write(db: sqlite3.Connection) -> bool:
        cur = db.execute(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_at = ?, finished_at = NULL"
            " WHERE id = ? AND state = 'failed'",
            (time.time(), delivery_id),
        )
        return cur.rowcount == 1

    return await store.write(write)


# -- views ------------------------------------------------------------------------------------------------


async def list_webhooks(store: Store, loop_id: str | None = None) -> list[WebhookView]:
    where, args = ("WHERE h.loop_id = ? OR h.loop_id IS NULL", (loop_id,)) if loop_id else ("", ())
    rows = await store.r.execute_fetchall(
        "SELECT h.id, h.loop_id, h.url, h.events, h.streak, h.created_at,"
        " (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = h.id AND d.state = 'pending'),"
        " (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = h.id AND d.state = 'delivered'),"
        " (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = h.id AND d.state = 'failed'),"
        " e.last_error, e.created_at FROM webhooks h LEFT JOIN webhook_deliveries e ON e.id = ("
        "   SELECT id FROM webhook_deliveries x WHERE x.webhook_id = h.id AND x.last_error IS NOT NULL"
        "   ORDER BY x.created_at DESC LIMIT 1)"
        f" {where} ORDER BY h.created_at",
        args,
    )
    return [
        WebhookView(
            id=r[0],
            loop_id=r[1],
            target=target_of(r[2]),
            events=[WebhookEvent(e) for e in r[3].split(",")],
            streak=r[4],
            created_at=r[5],
            pending=r[6],
            delivered=r[7],
            failed=r[8],
            last_error=r[9],
            last_error_at=r[10],
        )
        for r in rows
    ]


async def list_deliveries(
    store: Store,
    *,
    webhook_id: str | None,
    loop_id: str | None,
    state: DeliveryState | None,
    before: float | None,
    limit: int,
) -> DeliveryPage:
    clauses, args = [], []
    for column, value in (("webhook_id", webhook_id), ("loop_id", loop_id), ("state", state)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(str(value))
    if before is not None:
        clauses.append("created_at < ?")
        args.append(before)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await store.r.execute_fetchall(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {where} ORDER BY created_at DESC LIMIT ?",
        (*args, limit + 1),
    )
    items = [_delivery(r) for r in rows[:limit]]
    return DeliveryPage(items=items, next_before=items[-1].created_at if len(rows) > limit else None)


async def get_delivery(store: Store, delivery_id: str) -> DeliveryView | None:
    rows = await store.r.execute_fetchall(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?", (delivery_id,)
    )
    return _delivery(rows[0]) if rows else None


_DELIVERY_COLUMNS = (
    "id, webhook_id, loop_id, event, state, text, attempts, next_at, last_status, last_error,"
    " created_at, finished_at"
)


def _delivery(r: Any) -> DeliveryView:
    return DeliveryView(
        id=r[0],
        webhook_id=r[1],
        loop_id=r[2],
        event=WebhookEvent(r[3]),
        state=DeliveryState(r[4]),
        text=r[5],
        attempts=r[6],
        next_attempt_at=r[7] if r[4] == DeliveryState.pending else None,
        last_status=r[8],
        last_error=r[9],
        created_at=r[10],
        finished_at=r[11],
    )


async def loop_failures(store: Store, loop_id: str) -> tuple[int, int, DeliveryView | None]:
    """(deliveries of the loop's events that failed for good, those failing and still retried, the
    newest of either) for the loop's page."""
    rows = await store.r.execute_fetchall(
        "SELECT SUM(state = 'failed'), SUM(state = 'pending' AND last_error IS NOT NULL)"
        " FROM webhook_deliveries WHERE loop_id = ?",
        (loop_id,),
    )
    failed, retrying = (rows[0][0] or 0), (rows[0][1] or 0)
    if not failed and not retrying:
        return 0, 0, None
    newest = await store.r.execute_fetchall(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE loop_id = ? AND last_error IS NOT NULL"
        " AND state != 'delivered' ORDER BY created_at DESC LIMIT 1",
        (loop_id,),
    )
    return failed, retrying, (_delivery(newest[0]) if newest else None)
