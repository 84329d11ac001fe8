"""Keeps the gate's end-of-run report out of live output (pure: no I/O, no clock).

The gate writes `\\n__RATCHET_DONE__ <code>\\n` to stderr in one write once the workload is gone. Live
output goes to callers chunk by chunk, as the engine delivers it, so the report may arrive split
over two chunks. `MarkerFilter` passes stderr on at once, except a trailing piece that could still
grow into the report: that piece (at most a few dozen bytes, or two such lines when removing a
report would join them) waits for the next chunk.

A chunk that ends with a bare newline is passed on whole, so lines never wait; the price is that a
report whose leading newline arrived alone leaves that newline in the stream (an empty line). A
report is recognised at a line start for that reason too.
"""

from __future__ import annotations

import re

__all__ = ["MarkerFilter"]

_HEAD = b"__RATCHET_DONE__ "
_BODY = re.compile(rb"__RATCHET_DONE__ -?\d{1,10}\n")  # the shell's $? has at most 3 digits
_REPORT = re.compile(rb"\n" + _BODY.pattern)
_PARTIAL_BODY = re.compile(rb"__RATCHET_DONE__ -?\d{0,10}")
_MAX_PARTIAL = len(_HEAD) + 11


def _could_become_report(piece: bytes) -> bool:
    """True when `piece` (no newline in it) is the start of a report body that has not ended yet."""
    if not piece or len(piece) > _MAX_PARTIAL:
        return False
    return _HEAD.startswith(piece) or _PARTIAL_BODY.fullmatch(piece) is not None


class MarkerFilter:
    """Feed it stderr chunks in order; it returns what may be passed on now. `flush()` at the end."""

    def __init__(self) -> None:
        self._held = b""
        self._line_start = True  # the next byte to pass on starts a line

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        data = self._strip(data)
        cut = self._hold_from(data)
        out, self._held = data[:cut], data[cut:]
        if out:
            self._line_start = out.endswith(b"\n")
        return out

    def flush(self) -> bytes:
        """The held piece: the output has ended, so it was not a report."""
        out, self._held = self._held, b""
        return out

    def _strip(self, data: bytes) -> bytes:
        # Repeat until stable: removing one report must not join its neighbours into another.
        while True:
            new = _REPORT.sub(b"", data)
            if self._line_start:
                m = _BODY.match(new)
                if m is not None:
                    new = new[m.end() :]
            if new == data:
                return data
            data = new

    def _hold_from(self, data: bytes) -> int:
        """Where the piece that could still become a report starts (len(data): nothing to hold)."""
        nl = data.rfind(b"\n")
        if nl < 0:
            return 0 if self._line_start and _could_become_report(data) else len(data)
        if not _could_become_report(data[nl + 1 :]):
            return len(data)
        # The newline at `nl` may turn out to be a report's leading one and go with it: the line
        # before it then runs on into what follows the report. If that line could itself grow into
        # a report body, it waits too, or it would be out already when the join completes one.
        prev = data.rfind(b"\n", 0, nl)
        if (prev >= 0 or self._line_start) and _could_become_report(data[prev + 1 : nl]):
            return prev + 1
        return nl
