"""Every experiment's output, in one place: the live window while it runs, the stored file after.

A run's output arrives in its worker thread (the executor's `on_output`); followers are coroutines.
`LiveLog` keeps the newest `capacity` bytes and a running byte offset, so memory stays bounded
whatever a workload prints: a follower that falls behind the window is told how many bytes it
missed and goes on from the oldest byte still held. The worker thread never waits for the event
loop: it appends under a short lock and asks the loop for at most one wake-up at a time.

`RunLogs` holds the live logs of running experiments (the scheduler opens and closes them) and the
log files written when each one ends (`<data dir>/logs/<experiment id>.log`, fsynced). Followers
register nowhere, so one that disconnects leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

__all__ = ["LIVE_LOG_BYTES", "SKIPPED", "LiveLog", "RunLogs"]

LIVE_LOG_BYTES = 1024 * 1024  # newest output of each running experiment kept for followers
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


class RunLogs:
    """The live logs of running experiments and the stored logs of finished ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._live: dict[str, LiveLog] = {}
        self._changed = asyncio.Event()  # replaced on every set: each waiter sees one change
        self.ending = False  # the service is stopping: followers end rather than hold it up

    def path(self, exp_id: str) -> Path:
        return self.directory / f"{exp_id}.log"

    def open(self, exp_id: str) -> LiveLog:
        """The experiment starts: its output goes here until `close`."""
        live = self._live[exp_id] = LiveLog(asyncio.get_running_loop(), LIVE_LOG_BYTES)
        self._announce()
        return live

    def close(self, exp_id: str) -> None:
        """The experiment is over and its final status written: followers read it next."""
        live = self._live.pop(exp_id, None)
        if live is not None:
            live.close()
        self._announce()

    def live(self, exp_id: str) -> LiveLog | None:
        """The output of `exp_id` while it runs here; None when it does not."""
        return self._live.get(exp_id)

    async def save(self, exp_id: str, text: str) -> None:
        await asyncio.to_thread(self._write, self.path(exp_id), text)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    async def read(self, exp_id: str) -> bytes:
        """The log written when the experiment finished (empty when there is none, e.g. it never ran)."""
        path = self.path(exp_id)
        return await asyncio.to_thread(path.read_bytes) if path.exists() else b""

    async def changed(self, timeout: float) -> None:
        """Returns when an experiment starts or finishes (or `end_streams`), or after `timeout`."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def _announce(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def end_streams(self) -> None:
        """The service is stopping: followers of live output end now."""
        self.ending = True
        for live in self._live.values():
            live.wake_all()
        self._announce()
