"""Unit tests of `sandbox.logcap.CappedLog`: bounded memory, exact head and tail, honest marker."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.logcap import MARKER, CappedLog


def held(log: CappedLog) -> int:
    """Bytes the buffer holds right now."""
    return len(log._head) + sum(len(c) for c in log._tail)


def expected_text(data: bytes, limit: int) -> str:
    if len(data) <= limit:
        return data.decode("utf-8", errors="replace")
    head, tail = limit // 2, limit - limit // 2
    dropped = len(data) - head - tail
    return (data[:head] + MARKER.format(n=dropped).encode() + data[len(data) - tail :]).decode(
        "utf-8", errors="replace"
    )


def feed(log: CappedLog, data: bytes, sizes: list[int]) -> None:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        log.write(data[pos : pos + n])
        pos += n
        i += 1


def test_under_the_cap_everything_is_kept_without_marker():
    log = CappedLog(100)
    log.write(b"hello ")
    log.write(b"world\n")
    assert log.text() == "hello world\n"
    assert log.total == 12
    assert log.dropped == 0
    assert "ratchet:" not in log.text()


def test_exactly_at_the_cap_has_no_marker():
    log = CappedLog(10)
    log.write(b"0123456789")
    assert log.text() == "0123456789"
    assert log.dropped == 0


def test_one_byte_over_the_cap():
    log = CappedLog(10)
    log.write(b"0123456789X")
    assert log.text() == "01234\n[ratchet: 1 bytes of output dropped here]\n6789X"
    assert log.dropped == 1
    assert log.total == 11


def test_marker_states_dropped_bytes():
    log = CappedLog(8)
    for _ in range(100):
        log.write(b"abcdefghij")
    assert log.total == 1000
    assert log.dropped == 992
    assert log.text() == "abcd" + MARKER.format(n=992) + "ghij"


def test_empty_writes_count_nothing():
    log = CappedLog(16)
    log.write(b"")
    log.write(b"x")
    log.write(b"")
    assert (log.total, log.text(), log.dropped) == (1, "x", 0)


def test_fifty_megabytes_stay_bounded():
    limit = 64 * 1024
    log = CappedLog(limit)
    rng = random.Random(1234)
    source = rng.randbytes(1 << 16) * 5
    sizes = [1, 7, 100, 4095, 4096, 65536, 100_000, 3, 32_767, 32_768, 32_769, 250_000]
    total = 50 * 1024 * 1024
    head = bytearray()
    last = b""
    most = 0
    i = 0
    while log.total < total:
        start = rng.randrange(1 << 16)
        chunk = source[start : start + sizes[i % len(sizes)]]
        i += 1
        log.write(chunk)
        if len(head) < limit:
            head += chunk
        last = (last + chunk)[-limit:]
        most = max(most, held(log))
    assert log.total >= total
    assert log.dropped == log.total - limit
    half = limit // 2
    expected = bytes(head[:half]) + MARKER.format(n=log.total - limit).encode() + last[half - limit :]
    assert log.text() == expected.decode("utf-8", errors="replace")
    assert most <= limit, f"held up to {most} bytes for a limit of {limit}"


def test_text_replaces_invalid_utf8():
    log = CappedLog(100)
    log.write(b"ok \xff\xfe end")
    assert log.text() == "ok \ufffd\ufffd end"


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5, 17])
def test_tiny_limits(limit):
    log = CappedLog(limit)
    data = b"the quick brown fox jumps over the lazy dog"
    feed(log, data, [1, 2, 5])
    assert log.text() == expected_text(data, limit)
    assert log.dropped == max(0, len(data) - limit)


@settings(max_examples=200, deadline=None, database=None)
@given(
    limit=st.integers(min_value=1, max_value=300),
    chunks=st.lists(st.binary(max_size=200), max_size=40),
)
def test_never_holds_more_than_the_limit(limit, chunks):
    log = CappedLog(limit)
    for chunk in chunks:
        log.write(chunk)
        assert held(log) <= limit, f"holds {held(log)} bytes for a limit of {limit}"
