"""The engine's attach stream of one run, read in the run's thread: frames in, the gate's exit
reports counted, live output handed to the caller without them, and the exit hook fired once."""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Iterator

from .livefilter import MarkerFilter
from .spec import Timings

__all__ = ["ExitHook", "FrameReader", "OutputTap", "Reports", "strip_marker"]

log = logging.getLogger("ratchet.sandbox")

_DONE = re.compile(rb"\n__RATCHET_DONE__ (-?\d+)\n")
_DONE_TEXT = re.compile(r"\n__RATCHET_DONE__ -?\d+\n")


class OutputTap:
    """Hands output to a caller's callback once per read from the engine, minus the gate's report
    (which only ever travels on stderr). A failing callback never disturbs the run."""

    def __init__(self, callback: Callable[[bytes], None], run_id: str) -> None:
        self._callback = callback
        self._run_id = run_id
        self._stderr = MarkerFilter()
        self._pending: list[bytes] = []
        self.failures = 0

    def feed(self, stream: int, payload: bytes) -> None:
        self._pending.append(self._stderr.feed(payload) if stream == 2 else payload)

    def emit(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if not data:
            return
        try:
            self._callback(data)
        except Exception:
            self.failures += 1
            if self.failures == 1:  # once per run: a callback failing on every chunk must not flood the log
                log.exception("run %s: output callback failed; the run goes on", self._run_id)

    def close(self) -> None:
        self._pending.append(self._stderr.flush())
        self.emit()
        if self.failures > 1:
            log.warning("run %s: output callback failed %d times", self._run_id, self.failures)


class Reports:
    """Counts the gate's exit reports in the stderr stream, across reads and without double counting."""

    def __init__(self) -> None:
        self._buf = b""
        self.count = 0

    def feed(self, payload: bytes) -> bool:
        """True when `payload` completed at least one report."""
        buf, end, found = self._buf + payload, 0, False
        for match in _DONE.finditer(buf):
            self.count += 1
            end, found = match.end(), True
        self._buf = buf[end:][-96:]
        return found


class ExitHook:
    """Calls a caller's callback once when the workload has ended; its failure never disturbs the run."""

    def __init__(self, callback: Callable[[Timings], None] | None, run_id: str, timings: Timings) -> None:
        self._callback = callback
        self._run_id = run_id
        self._timings = timings

    def fire(self) -> None:
        callback, self._callback = self._callback, None
        if callback is None:
            return
        try:
            callback(self._timings)
        except Exception:
            log.exception("run %s: exit callback failed; the run goes on", self._run_id)


class FrameReader:
    """Parses the engine's multiplexed attach stream: 8-byte header (stream, size), then payload."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += data
        while len(self._buf) >= 8:
            stream, size = self._buf[0], struct.unpack(">I", self._buf[4:8])[0]
            if len(self._buf) < 8 + size:
                return
            payload = bytes(self._buf[8 : 8 + size])
            del self._buf[: 8 + size]
            yield stream, payload


def strip_marker(text: str) -> tuple[str, int]:
    """Removes the gate's report (its last occurrence) from the log; returns (text, bytes removed)."""
    matches = list(_DONE_TEXT.finditer(text))
    if not matches:
        return text, 0
    m = matches[-1]
    return text[: m.start()] + text[m.end() :], len(m.group(0))
