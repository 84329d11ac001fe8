"""Unit tests of `service.rules.ledger`: the `results.tsv` header and rows, byte for byte."""

from __future__ import annotations

import pytest

from service.rules.ledger import LEDGER_STATUSES, header, row

SNAP = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"


def test_header_reference_format():
    assert header("val_bpb") == "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"


def test_header_named_after_the_metric():
    assert header("accuracy") == "commit\taccuracy\tmemory_gb\tstatus\tdescription\n"
    assert header("eval/loss") == "commit\teval/loss\tmemory_gb\tstatus\tdescription\n"


def test_header_metric_name_cannot_add_columns():
    assert header("a\tb") == "commit\ta b\tmemory_gb\tstatus\tdescription\n"
    assert header("a\nb").count("\n") == 1


def test_keep_row():
    line = row(SNAP, "keep", 0.9979, 45060.2 / 1024, "baseline")
    assert line == "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"


def test_discard_row():
    line = row(SNAP, "discard", 1.0123456789, 12.345, "lr 0.02")
    assert line == "a1b2c3d\t1.012346\t12.3\tdiscard\tlr 0.02\n"


def test_commit_is_the_first_seven_hex_digits():
    assert row("0123456789abcdef", "keep", 1.0, 1.0, "x").split("\t")[0] == "0123456"


def test_metric_six_decimals_and_memory_one_decimal():
    assert row(SNAP, "keep", 2.0, 0.0, "x") == "a1b2c3d\t2.000000\t0.0\tkeep\tx\n"
    assert row(SNAP, "keep", 123.4567891, 79.96, "x") == "a1b2c3d\t123.456789\t80.0\tkeep\tx\n"
    assert row(SNAP, "keep", -0.5, 0.04, "x") == "a1b2c3d\t-0.500000\t0.0\tkeep\tx\n"


def test_missing_memory_is_zero():
    assert row(SNAP, "keep", 0.5, None, "x") == "a1b2c3d\t0.500000\t0.0\tkeep\tx\n"


def test_crash_row_records_zeros():
    assert row(SNAP, "crash", 1.5, 33.3, "oom") == "a1b2c3d\t0.000000\t0.0\tcrash\toom\n"
    assert row(SNAP, "crash", None, None, "no metric") == "a1b2c3d\t0.000000\t0.0\tcrash\tno metric\n"


def test_timeout_row_is_a_crash_row():
    assert row(SNAP, "timeout", 0.9, 10.0, "slow") == "a1b2c3d\t0.000000\t0.0\tcrash\tslow\n"


def test_description_tabs_and_newlines_are_flattened():
    line = row(SNAP, "discard", 1.0, 1.0, "try\tbigger\nmodel\r\nnow")
    assert line == "a1b2c3d\t1.000000\t1.0\tdiscard\ttry bigger model now\n"
    assert line.count("\t") == 4
    assert line.count("\n") == 1


def test_description_edges_trimmed():
    assert row(SNAP, "keep", 1.0, 1.0, "  \n padded \t ").endswith("\tkeep\tpadded\n")


def test_empty_description():
    assert row(SNAP, "keep", 1.0, 1.0, "") == "a1b2c3d\t1.000000\t1.0\tkeep\t\n"


def test_unicode_description_kept():
    assert row(SNAP, "keep", 1.0, 1.0, "d\u00e9j\u00e0 vu").endswith("\tkeep\td\u00e9j\u00e0 vu\n")


@pytest.mark.parametrize("status", ["keep", "discard", "crash", "timeout"])
def test_every_row_has_five_columns(status):
    fields = row(SNAP, status, 0.25, 1.25, "a\tb\nc").rstrip("\n").split("\t")
    assert len(fields) == 5
    assert fields[3] == ("crash" if status == "timeout" else status)


def test_ledger_statuses():
    assert LEDGER_STATUSES == ("keep", "discard", "crash", "timeout")
    assert "cancelled" not in LEDGER_STATUSES
    assert "error" not in LEDGER_STATUSES


def test_whole_ledger():
    text = header("val_bpb") + "".join(
        [
            row("1" * 64, "keep", 0.9979, 44.0, "baseline"),
            row("2" * 64, "discard", 1.0050, 44.2, "increase LR to 0.04"),
            row("3" * 64, "crash", None, None, "double the model width (OOM)"),
            row("4" * 64, "timeout", None, None, "hang"),
        ]
    )
    assert text == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "1111111\t0.997900\t44.0\tkeep\tbaseline\n"
        "2222222\t1.005000\t44.2\tdiscard\tincrease LR to 0.04\n"
        "3333333\t0.000000\t0.0\tcrash\tdouble the model width (OOM)\n"
        "4444444\t0.000000\t0.0\tcrash\thang\n"
    )
