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
import time
from collections.abc import AsyncIterator

from litestar.response import ServerSentEventMessage

from ..models import RUN_OVER
from ..runs.livelog import SKIPPED, LiveLog, TextDecoder
from ..runs.scheduler import Scheduler
from ..state.store import Store

__all__ = ["follow_events", "live_text", "read_stored_log", "split_text"]

KEEPALIVE_S = 10.0
STATUS_POLL_S = 1.0  # a queued experiment can be cancelled without ever taking a slot
READ_BYTES = 64 * 1024


async def follow_events(
    store: Store, scheduler: Scheduler, exp_id: str
) -> AsyncIterator[ServerSentEventMessage]:
    followed = False
    quiet_since = time.monotonic()
    while not scheduler.streams_ending:
        live = scheduler.live_log(exp_id)
        if live is not None:
            async for event in _follow_live(scheduler, live):
                yield event
            followed = True
            quiet_since = time.monotonic()
            continue
        exp = await store.get_experiment(exp_id, with_tail=False)
        if exp is None:
            return
        if exp.status in RUN_OVER:  # a confirming candidate's own run is over
            if not followed:
                for piece in split_text(await read_stored_log(scheduler, exp_id)):
                    yield ServerSentEventMessage(data=piece)
            yield ServerSentEventMessage(event="end", data=exp.status.value)
            return
        await scheduler.slots_changed(STATUS_POLL_S)
        if time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ServerSentEventMessage(data=None, comment="keep-alive")
            quiet_since = time.monotonic()
    yield ServerSentEventMessage(data=None, comment="service stopping")


async def read_stored_log(scheduler: Scheduler, exp_id: str) -> str:
    """The log written when the experiment finished ("" when there is none, e.g. never started)."""
    path = scheduler.logs_dir / f"{exp_id}.log"
    data = await asyncio.to_thread(path.read_bytes) if path.exists() else b""
    return data.decode("utf-8", errors="replace")


async def _follow_live(scheduler: Scheduler, live: LiveLog) -> AsyncIterator[ServerSentEventMessage]:
    """From the oldest byte held until the run's output is closed and read to its end."""
    decoder = TextDecoder()
    offset = 0
    quiet_since = time.monotonic()
    while not scheduler.streams_ending:
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
