"""Unit tests of `service.rules.extract`: metrics.json first, else the last `---` summary block."""

from __future__ import annotations

import json
import math

from service.rules.extract import MAX_METRICS, extract_metrics, implausible

SUMMARY = """step 100 loss 3.2
step 200 loss 2.9
---
val_bpb: 0.997900
training_seconds: 300.1
peak_vram_mb: 45060.2
num_steps: 953
"""


def test_summary_block():
    ex = extract_metrics(SUMMARY, None)
    assert ex.source == "summary"
    assert ex.problem is None
    assert ex.metrics == {
        "val_bpb": 0.9979,
        "training_seconds": 300.1,
        "peak_vram_mb": 45060.2,
        "num_steps": 953.0,
    }


def test_metrics_json_wins_over_summary():
    ex = extract_metrics(SUMMARY, json.dumps({"val_bpb": 0.5, "steps": 10}).encode())
    assert ex.source == "metrics.json"
    assert ex.problem is None
    assert ex.metrics == {"val_bpb": 0.5, "steps": 10.0}


def test_last_block_is_used():
    log = "---\nval_bpb: 9.0\nold: 1\n...\n---\nval_bpb: 1.25\nnew: 2\n"
    ex = extract_metrics(log, None)
    assert ex.metrics == {"val_bpb": 1.25, "new": 2.0}


def test_block_marker_may_have_surrounding_whitespace_and_crlf():
    log = "noise\r\n  ---  \r\nval_bpb: 0.75\r\n"
    assert extract_metrics(log, None).metrics == {"val_bpb": 0.75}


def test_longer_dash_lines_are_not_block_markers():
    log = "---\nval_bpb: 1.0\n----\nval_bpb: 2.0\n"
    assert extract_metrics(log, None).metrics == {"val_bpb": 2.0}
    assert extract_metrics("----\nval_bpb: 2.0\n", None).problem is not None


def test_all_numeric_pairs_captured_non_numeric_ignored():
    log = (
        "---\n"
        "val_bpb: 0.5\n"
        "name: charlm\n"
        "lr:1e-3\n"
        "  indented_key :  -2.5  \n"
        "eval/loss: 3\n"
        "device: cuda:0\n"
        "two words: 5\n"
        "value: 1.0 extra\n"
        "flag: true\n"
        "hexish: 0x10\n"
        "just a sentence\n"
    )
    ex = extract_metrics(log, None)
    assert ex.metrics == {"val_bpb": 0.5, "lr": 0.001, "indented_key": -2.5, "eval/loss": 3.0}


def test_non_finite_values_are_kept_for_the_judge():
    ex = extract_metrics("---\nval_bpb: nan\nother: inf\n", None)
    assert math.isnan(ex.metrics["val_bpb"])
    assert ex.metrics["other"] == math.inf


def test_later_duplicate_key_wins():
    assert extract_metrics("---\nx: 1\nx: 2\n", None).metrics == {"x": 2.0}


def test_no_block_is_a_problem():
    ex = extract_metrics("training...\nval_bpb: 0.5\n", None)
    assert ex.metrics == {}
    assert ex.source == "none"
    assert ex.problem == "no metrics.json and no '---' summary block in the output"


def test_empty_log_is_a_problem():
    ex = extract_metrics("", None)
    assert ex.problem == "no metrics.json and no '---' summary block in the output"


def test_empty_block_has_no_metrics():
    ex = extract_metrics("---\n", None)
    assert (ex.metrics, ex.source) == ({}, "summary")


def test_summary_is_capped():
    log = "---\n" + "".join(f"k{i}: {i}\n" for i in range(MAX_METRICS + 10))
    ex = extract_metrics(log, None)
    assert len(ex.metrics) == MAX_METRICS
    assert ex.metrics["k0"] == 0.0
    assert f"k{MAX_METRICS}" not in ex.metrics


def test_metrics_json_values():
    raw = json.dumps(
        {"val_bpb": 0.75, "int": 3, "str_num": "1.5", "text": "hi", "flag": True, "none": None, "list": [1]}
    ).encode()
    ex = extract_metrics("", raw)
    assert ex.metrics == {"val_bpb": 0.75, "int": 3.0, "str_num": 1.5}
    assert ex.problem is None


def test_metrics_json_long_keys_skipped():
    ex = extract_metrics("", json.dumps({"k" * 65: 1, "k" * 64: 2}).encode())
    assert ex.metrics == {"k" * 64: 2.0}


def test_metrics_json_is_capped():
    raw = json.dumps({f"k{i}": i for i in range(MAX_METRICS + 5)}).encode()
    assert len(extract_metrics("", raw).metrics) == MAX_METRICS


def test_malformed_metrics_json_is_a_problem_and_does_not_fall_back():
    ex = extract_metrics(SUMMARY, b"{val_bpb: 0.5")
    assert ex.source == "metrics.json"
    assert ex.metrics == {}
    assert ex.problem is not None
    assert ex.problem.startswith("metrics.json is not valid JSON: ")


def test_metrics_json_not_utf8_is_a_problem():
    ex = extract_metrics("", b'{"val_bpb": "\xff"}')
    assert ex.problem is not None
    assert ex.problem.startswith("metrics.json is not valid JSON")


def test_metrics_json_must_be_an_object():
    for raw in (b"[1, 2]", b"0.5", b'"x"', b"null"):
        ex = extract_metrics(SUMMARY, raw)
        assert ex.problem == "metrics.json must hold a JSON object"
        assert ex.metrics == {}


def test_empty_metrics_json_file_is_a_problem():
    ex = extract_metrics(SUMMARY, b"")
    assert ex.source == "metrics.json"
    assert ex.problem is not None and "not valid JSON" in ex.problem


def test_metrics_json_nan_literal_is_kept():
    ex = extract_metrics("", b'{"val_bpb": NaN}')
    assert math.isnan(ex.metrics["val_bpb"])


def test_non_numeric_values_are_reported():
    out = extract_metrics("", b'{"val_bpb": null, "steps": 3}')
    assert out.metrics == {"steps": 3.0} and out.non_numeric == {"val_bpb": "null"}
    out = extract_metrics("---\nval_bpb: oops\nsteps: 4\n", None)
    assert out.metrics == {"steps": 4.0} and out.non_numeric == {"val_bpb": "oops"}


def test_implausible_outside_the_declared_range():
    assert implausible("val_bpb", -1e300, 0.0, 100.0) == (
        "val_bpb -1e+300 is outside the loop's plausible range [0, 100] (metric.min_value/max_value)"
    )
    assert "[-inf, 8]" in implausible("val_bpb", 9.5, None, 8.0)
    assert "[0, inf]" in implausible("val_bpb", -0.5, 0.0, None)
    for value in (0.0, 50.0, 100.0):  # the bounds themselves are plausible
        assert implausible("val_bpb", value, 0.0, 100.0) is None
    assert implausible("val_bpb", 1e308, None, None) is None  # no range declared: any finite value
    assert implausible("val_bpb", math.nan, 0.0, 1.0) is None  # non-finite values are judged elsewhere
