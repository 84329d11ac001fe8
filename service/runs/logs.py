"""The output of running experiments as it happens, for `GET /v1/experiments/{id}/logs?follow=true`.

A run's output arrives in its worker thread (the sandbox's `on_output`); followers are coroutines.
`LiveLog` keeps the newest `capacity` bytes and a running byte offset, so memory stays bounded
whatever a workload prints: a follower that falls behind the window is told how many bytes it
missed and goes on from the oldest byte still held. The worker thread never waits for the event
loop: it appends under a short lock and asks the loop for at most one wake-up at a time.

Followers register nowhere, so one that disconnects leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["SKIPPED", "LiveLog", "TextDecoder", "on_exit_signals"]

log = logging.getLogger("ratchet.livelog")

SKIPPED = "\n[ratchet: {n} bytes of output skipped here]\n"


class LiveLog:
    """Newest output of one run. `write` from any thread; everything else on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = capacity
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._start = 0  # offset of _buf[0] in the run's whole output
        self._wake_pending = False
        self._changed = asyncio.Event()
        self.closed = False

    @property
    def end(self) -> int:
        """Bytes written so far: the offset the next byte will have."""
        with self._lock:
            return self._start + len(self._buf)

    def write(self, data: bytes) -> None:
        """Called by the run's thread with each piece of output."""
        with self._lock:
            if len(data) >= self._capacity:
                self._start += len(self._buf) + len(data) - self._capacity
                self._buf = bytearray(data[-self._capacity :])
            else:
                self._buf += data
                excess = len(self._buf) - self._capacity
                if excess > 0:
                    del self._buf[:excess]
                    self._start += excess
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is left to wake
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """The run is over: followers read what is left, then stop waiting."""
        self.closed = True
        self._notify()

    def wake_all(self) -> None:
        """Makes every waiting follower look again (e.g. the service is stopping)."""
        self._notify()

    def read(self, offset: int, limit: int) -> tuple[int, bytes, int]:
        """Up to `limit` bytes from `offset`: (bytes skipped because they left the window, data,
        the offset after data)."""
        with self._lock:
            skipped = max(0, self._start - offset)
            offset += skipped
            i = offset - self._start
            data = bytes(self._buf[i : i + limit])
        return skipped, data, offset + len(data)

    def tail(self, n: int) -> tuple[int, bytes]:
        """The last `n` bytes held and how many bytes came before them."""
        with self._lock:
            data = bytes(self._buf[-n:]) if n else b""
            return self._start + len(self._buf) - len(data), data

    async def wait(self, offset: int, timeout: float) -> None:
        """Returns when there are bytes after `offset`, the log is closed, `wake_all` was called or
        `timeout` passed, whichever comes first."""
        changed = self._changed  # taken before the check: a write after it sets this very event
        if self.closed or self.end > offset:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)


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


@contextlib.contextmanager
def on_exit_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Also runs `callback` on the event loop when SIGINT or SIGTERM arrives.

    uvicorn finishes open responses before it runs the lifespan's shutdown, so a follower would
    hold a stopping service up for its whole graceful-shutdown timeout; this lets followers end at
    once. The handlers already installed (uvicorn's) still run. Outside the main thread
    signals cannot be handled: then this does nothing, as it does for a signal nobody handles."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(RuntimeError):  # first: the previous handler may raise
            loop.call_soon_threadsafe(callback)
        previous[signum](signum, frame)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if callable(prev):  # else the signal ends the process: nothing waits for followers
                previous[sig] = prev
                signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev)
