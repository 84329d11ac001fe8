"""Unit tests of `sandbox.livefilter.MarkerFilter`: live stderr passes on at once, the gate's report
never does, however the engine splits the stream."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.livefilter import MarkerFilter

REPORT = b"\n__RATCHET_DONE__ 0\n"
# A report body at the start of a line, complete: must never reach a reader.
LEAKED = re.compile(rb"(?:^|\n)__RATCHET_DONE__ -?\d{1,10}\n")


def run(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    """All output, and what came out after each chunk."""
    f = MarkerFilter()
    steps = [f.feed(c) for c in chunks]
    return b"".join(steps) + f.flush(), steps


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_ordinary_lines_pass_at_once_whole():
    out, steps = run([b"step 1\n", b"step 2", b" done\n", b"10%\r20%\r"])
    assert steps == [b"step 1\n", b"step 2", b" done\n", b"10%\r20%\r"]
    assert out == b"step 1\nstep 2 done\n10%\r20%\r"


def test_report_in_one_chunk_is_removed_with_its_newline():
    assert run([b"last line\n" + REPORT])[0] == b"last line\n"
    assert run([b"no newline at the end" + REPORT])[0] == b"no newline at the end"
    assert run([REPORT])[0] == b""
    assert run([b"a\n", b"\n__RATCHET_DONE__ 137\n"])[0] == b"a\n"
    assert run([b"x\n__RATCHET_DONE__ -1\n"])[0] == b"x"


def test_report_split_anywhere_never_leaks():
    data = b"tail of stderr" + REPORT
    for i in range(1, len(data)):
        out, _ = run([data[:i], data[i:]])
        # A chunk that ends with the report's own newline passes that newline on (lines never wait).
        extra = b"\n" if i == len(b"tail of stderr") + 1 else b""
        assert out == b"tail of stderr" + extra, i


def test_partial_report_is_held_then_released_when_it_turns_out_not_to_be_one():
    f = MarkerFilter()
    assert f.feed(b"ok\n__RATCHET_DO") == b"ok"
    assert f.feed(b"NE__ 1") == b""
    assert f.feed(b"x\n") == b"\n__RATCHET_DONE__ 1x\n"
    assert f.feed(b"__RATCH") == b""  # at a line start: could still be a report
    assert f.flush() == b"__RATCH"  # the output ended: it was not


def test_holding_is_bounded():
    f = MarkerFilter()
    assert f.feed(b"\n__RATCHET_DONE__ 1234567890") == b""
    assert f.feed(b"1") == b"\n__RATCHET_DONE__ 12345678901"  # more digits than any exit code
    out, _ = run([b"x\n" + b"__RATCHET_DONE__ " + b"9" * 50])
    assert out.endswith(b"9" * 50)


def test_a_report_removed_across_chunks_does_not_join_lines_into_one():
    # Removing the report (with its leading newline) would join the first line with the `0\n` after
    # it into a complete report body; the first line must wait with the held newline for that.
    data = b"__RATCHET_DONE__ \n__RATCHET_DONE__ 0\n0\n"
    for cut in range(len(data) + 1):
        out, _ = run(split(data, [cut]))
        assert LEAKED.search(out) is None, cut


def test_report_lookalikes_printed_by_the_workload_are_removed_too():
    out, _ = run([b"a\n__RATCHET_DONE__ 0\nb\n", REPORT])
    assert out == b"ab\n"  # with the newline before it, as a report is removed from the stored log
    # removing one must not join its neighbours into another
    out, _ = run([b"\n__RATCHET_DONE__ \n__RATCHET_DONE__ 0\n0\n"])
    assert LEAKED.search(out) is None


TEXT = st.binary(max_size=300).map(lambda b: b.replace(b"_", b"-"))  # nothing that starts a report


@settings(max_examples=300, deadline=None)
@given(TEXT, st.lists(st.integers(min_value=0), max_size=12))
def test_text_without_reports_passes_unchanged_and_is_never_held(text, cuts):
    chunks = split(text, cuts)
    out, steps = run(chunks)
    assert out == text
    assert steps == chunks  # nothing waited for a later chunk


@settings(max_examples=300, deadline=None)
@given(TEXT, st.integers(min_value=-1, max_value=255), st.lists(st.integers(min_value=0), max_size=8))
def test_report_after_any_text_split_anyhow_is_removed(text, code, cuts):
    report = f"\n__RATCHET_DONE__ {code}\n".encode()
    data = text + report
    chunks = split(data, cuts)
    out, _ = run(chunks)
    ends = {len(b"".join(chunks[: i + 1])) for i in range(len(chunks))}
    extra = b"\n" if len(text) + 1 in ends else b""
    assert out == text + extra


TOKENS = st.sampled_from(
    [b"\n", b"_", b"__RATCHET_DONE__ ", b"__RATCHET_DONE__ 0\n", REPORT, b"0", b"-", b"7", b"x", b"\r"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(TOKENS, max_size=30), st.lists(st.integers(min_value=0), max_size=10))
def test_adversarial_streams_never_show_a_complete_report(tokens, cuts):
    data = b"".join(tokens)
    out, _ = run(split(data, cuts))
    assert LEAKED.search(out) is None
    assert len(out) <= len(data)
