"""Unit tests of `service.rules.decisions`: every branch of `decide` and the strictness of `improves`."""

from __future__ import annotations

import math

import pytest

from service.rules.decisions import Decision, Outcome, decide, improves


def judge(outcome: Outcome, *, best=1.0, baseline=False, direction="minimize", min_delta=0.0) -> Decision:
    return decide(
        outcome,
        metric_name="val_bpb",
        direction=direction,
        min_delta=min_delta,
        best=best,
        baseline=baseline,
    )


def ok(metric: float | None) -> Outcome:
    return Outcome(exit_code=0, metric=metric)


# -- failures ------------------------------------------------------------------------------------------


def test_cancelled_wins_over_everything():
    out = Outcome(exit_code=0, metric=0.1, cancelled=True, timed_out=True, oom_killed=True)
    d = judge(out, baseline=True)
    assert (d.status, d.reason, d.becomes_best) == ("cancelled", "cancelled", False)


def test_timeout():
    d = judge(Outcome(exit_code=137, timed_out=True, timeout_s=600.0, metric=0.1))
    assert (d.status, d.reason, d.becomes_best) == ("timeout", "killed at the hard timeout of 600 s", False)


def test_timeout_fractional_seconds_in_reason():
    d = judge(Outcome(exit_code=None, timed_out=True, timeout_s=12.5))
    assert d.reason == "killed at the hard timeout of 12.5 s"


def test_timeout_wins_over_oom():
    d = judge(Outcome(exit_code=137, timed_out=True, oom_killed=True, timeout_s=10))
    assert d.status == "timeout"


def test_oom_is_a_crash_even_with_exit_zero_and_a_metric():
    d = judge(Outcome(exit_code=0, oom_killed=True, memory_mb=2048, metric=0.5))
    assert (d.status, d.reason, d.becomes_best) == ("crash", "out of memory (limit 2048 MB)", False)


def test_a_forged_end_of_run_report_is_a_crash_even_with_exit_zero_and_a_winning_metric():
    d = judge(Outcome(exit_code=0, report_forged=True, metric=0.001), baseline=True)
    assert (d.status, d.becomes_best) == ("crash", False)
    assert "end-of-run report itself (forged)" in d.reason


def test_a_sandbox_that_died_without_the_gate_report_says_so():
    d = judge(Outcome(exit_code=2, exit_reported=False))
    assert d.status == "crash"
    assert d.reason.startswith("the sandbox died before the workload's exit was reported")
    assert "(container exit code 2)" in d.reason
    oom = judge(Outcome(exit_code=137, exit_reported=False, oom_killed=True, memory_mb=64))
    assert oom.reason == "out of memory (limit 64 MB)"  # the engine's verdict, when it has one, wins


@pytest.mark.parametrize("code", [1, 2, 137, -9, 255])
def test_nonzero_exit_is_a_crash_even_with_a_good_metric(code):
    d = judge(Outcome(exit_code=code, metric=0.1))
    assert (d.status, d.reason, d.becomes_best) == ("crash", f"exited with code {code}", False)


def test_missing_exit_code_is_a_crash():
    d = judge(Outcome(exit_code=None, metric=0.1))
    assert (d.status, d.reason) == ("crash", "exited with code None")


def test_missing_metric_is_a_crash_with_default_reason():
    d = judge(ok(None))
    assert (d.status, d.reason, d.becomes_best) == ("crash", "metric 'val_bpb' not reported", False)


def test_missing_metric_uses_the_extraction_problem():
    d = judge(Outcome(exit_code=0, metric=None, metric_problem="no metrics.json and no '---' summary block"))
    assert (d.status, d.reason) == ("crash", "no metrics.json and no '---' summary block")


def test_missing_metric_on_baseline_is_a_crash():
    d = judge(ok(None), best=None, baseline=True)
    assert (d.status, d.becomes_best) == ("crash", False)


@pytest.mark.parametrize(("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
def test_non_finite_metric_is_a_crash(value, shown):
    d = judge(ok(value))
    assert (d.status, d.reason, d.becomes_best) == (
        "crash",
        f"val_bpb is {shown}, not a finite number",
        False,
    )


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_non_finite_baseline_is_a_crash(direction):
    # -inf would "beat" anything when minimizing and +inf when maximizing; neither may found the best.
    for value in (math.nan, math.inf, -math.inf):
        d = judge(ok(value), best=None, baseline=True, direction=direction)
        assert (d.status, d.becomes_best) == ("crash", False)


# -- baseline ------------------------------------------------------------------------------------------


def test_baseline_is_kept_and_founds_the_best():
    d = judge(ok(0.9979), best=None, baseline=True)
    assert (d.status, d.reason, d.becomes_best) == ("keep", "baseline val_bpb 0.997900", True)


def test_baseline_is_kept_even_when_worse_than_an_earlier_best():
    d = judge(ok(5.0), best=1.0, baseline=True)
    assert (d.status, d.becomes_best) == ("keep", True)


def test_candidate_without_a_best_is_discarded():
    d = judge(ok(0.1), best=None)
    assert (d.status, d.reason, d.becomes_best) == (
        "discard",
        "no successful baseline to compare against",
        False,
    )


# -- comparison ----------------------------------------------------------------------------------------


def test_minimize_strict_improvement_is_kept():
    d = judge(ok(0.95), best=1.0)
    assert (d.status, d.reason, d.becomes_best) == ("keep", "val_bpb 0.950000 beats best 1.000000", True)


def test_minimize_equal_is_discarded():
    d = judge(ok(1.0), best=1.0)
    assert (d.status, d.reason, d.becomes_best) == (
        "discard",
        "val_bpb 1.000000 is not better than best 1.000000",
        False,
    )


def test_minimize_worse_is_discarded():
    assert judge(ok(1.01), best=1.0).status == "discard"


def test_maximize_strict_improvement_is_kept():
    d = judge(ok(0.81), best=0.8, direction="maximize")
    assert (d.status, d.becomes_best) == ("keep", True)


def test_maximize_lower_is_discarded():
    d = judge(ok(0.7), best=0.8, direction="maximize")
    assert (d.status, d.becomes_best) == ("discard", False)


def test_maximize_equal_is_discarded():
    assert judge(ok(0.8), best=0.8, direction="maximize").status == "discard"


def test_min_delta_boundary_is_not_a_keep():
    # 0.75 and 0.25 are exact in binary: the gain is exactly min_delta.
    d = judge(ok(0.75), best=1.0, min_delta=0.25)
    assert (d.status, d.becomes_best) == ("discard", False)
    assert d.reason == "val_bpb 0.750000 is not better than best 1.000000 by more than 0.25"


def test_min_delta_just_beyond_is_a_keep():
    d = judge(ok(0.7499), best=1.0, min_delta=0.25)
    assert (d.status, d.becomes_best) == ("keep", True)


def test_min_delta_within_noise_is_discarded():
    d = judge(ok(0.999), best=1.0, min_delta=0.005)
    assert d.status == "discard"


def test_min_delta_maximize_boundary():
    assert judge(ok(1.25), best=1.0, min_delta=0.25, direction="maximize").status == "discard"
    assert judge(ok(1.2501), best=1.0, min_delta=0.25, direction="maximize").status == "keep"


def test_reason_has_no_min_delta_clause_when_zero():
    d = judge(ok(2.0), best=1.0, min_delta=0.0)
    assert "by more than" not in d.reason


def test_metric_name_appears_in_reasons():
    d = decide(ok(0.5), metric_name="accuracy", direction="maximize", min_delta=0, best=0.4, baseline=False)
    assert d.reason == "accuracy 0.500000 beats best 0.400000"


@pytest.mark.parametrize(
    ("value", "best", "direction", "min_delta", "expected"),
    [
        (0.9, 1.0, "minimize", 0.0, True),
        (1.0, 1.0, "minimize", 0.0, False),
        (1.1, 1.0, "minimize", 0.0, False),
        (0.75, 1.0, "minimize", 0.25, False),
        (0.5, 1.0, "minimize", 0.25, True),
        (1.1, 1.0, "maximize", 0.0, True),
        (1.0, 1.0, "maximize", 0.0, False),
        (0.9, 1.0, "maximize", 0.0, False),
        (1.25, 1.0, "maximize", 0.25, False),
        (-2.0, -1.0, "minimize", 0.5, True),
        (-1.0, -2.0, "maximize", 0.5, True),
    ],
)
def test_improves(value, best, direction, min_delta, expected):
    assert improves(value, best, direction, min_delta) is expected


def test_decision_values_are_plain_strings():
    d = judge(ok(0.5), best=1.0)
    assert d.status == "keep"
    assert str(d.status) == "keep"
