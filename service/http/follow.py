"""The events of `GET /v1/experiments/{id}/logs?follow=true` (server-sent events).

    data: <the next piece of output; concatenate the data of successive events>
    : keep-alive                      (a comment, about every 10 s while nothing else is sent)
    event: end / data: <final status> (the experiment ended; the stream closes after it)

A queued experiment is waited for; a running one is followed from its live window (oldest bytes
first) until it ends; a finished one sends its stored log. The stream closes without `end` when the
service stops. SSE carries text by lines, so CR, LF and CRLF all arrive as LF.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from litestar.response import ServerSentEventMessage

from ..models import RUN_OVER
from ..runs.logs import SKIPPED, LiveLog, RunLogs
from ..state.store import Store

__all__ = ["Lookup", "TextDecoder", "follow_events", "live_text", "split_text"]

# The followed run's (status, whether its run is over), or None when it does not exist.
Lookup = Callable[[str], Awaitable[tuple[str, bool] | None]]

KEEPALIVE_S = 10.0
STATUS_POLL_S = 1.0  # a queued experiment can be cancelled without ever taking a slot
READ_BYTES = 64 * 1024


async def _experiment(store: Store, exp_id: str) -> tuple[str, bool] | None:
    exp = await store.get_experiment(exp_id, with_tail=False)
    return None if exp is None else (exp.status.value, exp.status in RUN_OVER)  # confirming: run over


async def follow_events(
    store: Store, logs: RunLogs, exp_id: str, lookup: Lookup | None = None
) -> AsyncIterator[ServerSentEventMessage]:
    """Follows an experiment's log, or with `lookup` any run whose logs `logs` keeps (a proposal)."""
    followed = False
    quiet_since = time.monotonic()
    while not logs.ending:
        live = logs.live(exp_id)
        if live is not None:
            async for event in _follow_live(logs, live):
                yield event
            followed = True
            quiet_since = time.monotonic()
            continue
        found = await (lookup(exp_id) if lookup is not None else _experiment(store, exp_id))
        if found is None:
            return
        status, over = found
        if over:
            if not followed:
                stored = (await logs.read(exp_id)).decode("utf-8", errors="replace")
                for piece in split_text(stored):
                    yield ServerSentEventMessage(data=piece)
            yield ServerSentEventMessage(event="end", data=status)
            return
        await logs.changed(STATUS_POLL_S)
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ServerSentEventMessage(data=None, comment="keep-alive")
            quiet_since = time.monotonic()
    yield ServerSentEventMessage(data=None, comment="service stopping")


async def _follow_live(logs: RunLogs, live: LiveLog) -> AsyncIterator[ServerSentEventMessage]:
    """From the oldest byte held until the run's output is closed and read to its end."""
    decoder = TextDecoder()
    offset = 0
    quiet_since = time.monotonic()
    while not logs.ending:
        closed = live.closed  # before the read: once closed, nothing more is written
        skipped, data, offset = live.read(offset, READ_BYTES)
        if skipped:
            decoder.reset()
        text = (SKIPPED.format(n=skipped) if skipped else "") + decoder.decode(
            data, final=closed and not data
        )
        if text:
            yield ServerSentEventMessage(data=text)
            quiet_since = time.monotonic()
            await asyncio.sleep(0)  # a flood must not keep the event loop from everything else
            continue
        if closed:
            return
        left = KEEPALIVE_S - (time.monotonic() - quiet_since)
        if left <= 0:
            yield ServerSentEventMessage(data=None, comment="keep-alive")
            quiet_since = time.monotonic()
            continue
        await live.wait(offset, left)


def split_text(text: str, size: int = READ_BYTES) -> list[str]:
    """The stored log in events of bounded size. CRLF becomes LF first so that no pair is split."""
    text = text.replace("\r\n", "\n")
    return [text[i : i + size] for i in range(0, len(text), size)]


def live_text(live: LiveLog, limit: int, mark_gap: bool = True) -> str:
    """The newest `limit` bytes of a running experiment's output; with `mark_gap`, marked when
    older bytes exist (a whole log says so; a tail is a tail)."""
    before, data = live.tail(limit)
    text = data.decode("utf-8", errors="replace")
    return SKIPPED.format(n=before) + text if before and mark_gap else text


class TextDecoder:
    """Bytes to text for one follower: a character split over two reads stays whole, and a CRLF
    split over two reads does not become two line breaks (SSE treats CR, LF and CRLF alike)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after_cr = False

    def decode(self, data: bytes, final: bool = False) -> str:
        text = self._utf8.decode(data, final)
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        if text:
            self._after_cr = text.endswith("\r")
        return text

    def reset(self) -> None:
        """After a gap: whatever was half-decoded belongs to bytes that were skipped."""
        self._utf8.reset()
        self._after_cr = False
