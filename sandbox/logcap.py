"""A log buffer of fixed size: the head and the tail are kept, the middle is dropped and marked."""

from __future__ import annotations

from collections import deque

MARKER = "\n[ratchet: {n} bytes of output dropped here]\n"


class CappedLog:
    """Keeps the first and last `limit // 2` bytes written; memory stays bounded whatever arrives."""

    def __init__(self, limit: int) -> None:
        self._head_cap = limit // 2
        self._tail_cap = limit - self._head_cap
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        if len(chunk) >= self._tail_cap:
            self._tail.clear()
            chunk = chunk[-self._tail_cap :]
            self._tail_len = 0
        self._tail.append(chunk)
        self._tail_len += len(chunk)
        while self._tail_len > self._tail_cap:  # trim the oldest chunk: never hold more than the cap
            excess = self._tail_len - self._tail_cap
            oldest = self._tail[0]
            if len(oldest) <= excess:
                self._tail.popleft()
                self._tail_len -= len(oldest)
            else:
                self._tail[0] = oldest[excess:]
                self._tail_len -= excess

    @property
    def dropped(self) -> int:
        return self.total - len(self._head) - self._tail_len

    def text(self) -> str:
        tail = b"".join(self._tail)
        middle = MARKER.format(n=self.dropped).encode() if self.dropped else b""
        return (bytes(self._head) + middle + tail).decode("utf-8", errors="replace")
