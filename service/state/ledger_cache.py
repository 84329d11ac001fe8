"""The `results.tsv` rows of recently read loops, kept in memory. Rows enter the ledger in
finishing order and never change afterwards, so a cached ledger only needs the rows that finished
since; should a row already in it change after all, the database moves the loop's `ledger_rev`
(a trigger does) and the ledger is rebuilt."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

import msgspec

from ..rules.ledger import LEDGER_STATUSES, row
from .store import Store

__all__ = ["LedgerCache"]


class _Entry(msgspec.Struct):
    rev: int
    upto: int = 0  # finish_seq of the last row held
    parts: list[bytes] = msgspec.field(default_factory=list)
    size: int = 0


class LedgerCache:
    def __init__(self, store: Store, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def rows(self, loop_id: str) -> AsyncIterator[bytes]:
        """The ledger's rows (no header) as chunks of bytes, brought up to date first."""
        async with self._locks.setdefault(loop_id, asyncio.Lock()):
            entry = await self._refresh(loop_id)
            parts = list(entry.parts)
        for part in parts:
            yield part

    async def _refresh(self, loop_id: str) -> _Entry:
        state = await self.store.ledger_state(loop_id)
        rev = state[0] if state else 0
        entry = self._entries.get(loop_id)
        if entry is None or entry.rev != rev:
            entry = _Entry(rev=rev)
        async for batch in self.store.ledger_rows(loop_id, LEDGER_STATUSES, after=entry.upto):
            text = "".join(row(r.snapshot, r.status, r.metric, r.memory_gb, r.description) for r in batch)
            part = text.encode()
            entry.parts.append(part)
            entry.size += len(part)
            entry.upto = batch[-1].finish_seq
        if len(entry.parts) > 64:  # many small appends: one part again
            entry.parts = [b"".join(entry.parts)]
        self._entries[loop_id] = entry
        self._entries.move_to_end(loop_id)
        self._evict()
        return entry

    def _evict(self) -> None:
        total = sum(e.size for e in self._entries.values())
        while total > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= old.size
