"""Unit tests of the runner's count of the gate's end-of-run reports (no engine): the gate writes
exactly one; a workload that writes one itself must show up as a second, however it splits it."""

from __future__ import annotations

from sandbox.stream import Reports

REPORT = b"\n__RATCHET_DONE__ 0\n"


def feed_all(chunks: list[bytes]) -> tuple[Reports, list[bool]]:
    reports = Reports()
    return reports, [reports.feed(c) for c in chunks]


def test_one_report_split_across_reads_counts_once():
    reports, completed = feed_all([b"noise\n__RATCHET", b"_DONE__ 3", b"\n", b"more"])
    assert reports.count == 1
    assert completed == [False, False, True, False]


def test_a_forged_report_before_the_real_one_counts_twice():
    reports, _ = feed_all([b"step 1\n", REPORT, b"x" * 100_000, b"\n__RATCHET_DONE__ 137\n"])
    assert reports.count == 2


def test_a_partial_forgery_cannot_swallow_the_real_report():
    # An unterminated forged report, completed by the real report's leading newline: one match
    # swallows the other's start, yet the early complete forgery still makes two in all.
    reports, _ = feed_all([REPORT, b"\n__RATCHET_DONE__ 5", b"\n__RATCHET_DONE__ 0\n"])
    assert reports.count == 2


def test_reports_in_one_read_all_count():
    reports, completed = feed_all([REPORT + b"between" + REPORT])
    assert (reports.count, completed) == (2, [True])
