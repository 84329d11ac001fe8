"""The service's own metrics: labels from fixed sets, and gauges that are right after a restart."""

from __future__ import annotations

import platform
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_api import TRAIN, edit, make_loop

from sandbox import SandboxError, SpecError
from service import metrics as m
from service.http.app import VERSION
from service.rules.decisions import Outcome, decide

outcomes = st.builds(
    Outcome,
    exit_code=st.one_of(st.none(), st.integers(-20, 300)),
    oom_killed=st.booleans(),
    timed_out=st.booleans(),
    cancelled=st.booleans(),
    exit_reported=st.booleans(),
    report_forged=st.booleans(),
    metric=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)


@given(outcome=outcomes, baseline=st.booleans(), best=st.one_of(st.none(), st.floats(-10, 10)))
def test_failure_reason_matches_the_decision(outcome: Outcome, baseline: bool, best: float | None):
    """Every crash or timeout verdict has a cause from the fixed set, the one `decide` acted on."""
    decision = decide(
        outcome, metric_name="val_bpb", direction="minimize", min_delta=0.0, best=best, baseline=baseline
    )
    if decision.status not in m.FAILED:
        return
    reason = m.failure_reason(outcome)
    assert reason in m.FAILURE_REASONS and reason not in ("engine", "internal")
    assert (reason == "timeout") == (decision.status == "timeout")
    assert (reason == "oom") == ("out of memory" in decision.reason)
    exited = "exited with code" in decision.reason or "sandbox died" in decision.reason
    assert (reason == "exit_nonzero") == exited
    assert (reason == "forged_report") == ("(forged)" in decision.reason)


def test_a_metric_that_is_not_a_number_is_not_missing():
    no_metric = Outcome(exit_code=0, metric=None)
    assert m.failure_reason(no_metric) == "missing_metric"
    assert m.failure_reason(no_metric, unparsable=True) == "non_finite_metric"
    assert m.failure_reason(Outcome(exit_code=0, metric=float("inf"))) == "non_finite_metric"


@pytest.mark.parametrize(
    "exc,reason",
    [
        (SandboxError("start: image not found", "image_missing"), "image_missing"),
        (SandboxError("create container: engine refused: no such device"), "refused"),
        (SandboxError("connect: engine unreachable", "unreachable"), "unreachable"),
        (SandboxError("odd", "something new"), "refused"),
        (SpecError("bad"), "bad_spec"),
        (OSError("snapshot missing"), "setup"),
    ],
)
def test_engine_error_reasons_are_a_fixed_set(exc: BaseException, reason: str):
    assert m.engine_error_reason(exc) == reason
    assert reason in m.ENGINE_ERROR_REASONS


def samples(srv) -> dict[tuple[str, frozenset], float]:
    text = srv.client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(srv, name: str, **labels: str) -> float | None:
    return samples(srv).get((name, frozenset(labels.items())))


def wait_sample(srv, name: str, value: float, timeout: float = 10, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (got := sample(srv, name, **labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} is {got}, expected {value}"
        time.sleep(0.2)


def test_gauges_after_restart_and_stop(server_factory):
    srv = server_factory(name="data")
    loop = make_loop(srv, name="restart")
    lid = loop["id"]
    srv.wait_idle(lid)
    r = srv.client.post(f"/v1/loops/{lid}/experiments", json={"description": "a", "patch": edit("0.5")})
    assert r.status_code == 202
    srv.wait_idle(lid)
    srv.client.post(f"/v1/loops/{lid}/pause")
    for v in ("0.4", "0.3"):
        body = {"description": v, "files": {"train.py": TRAIN.replace("V = 1.0", f"V = {v}")}}
        assert srv.client.post(f"/v1/loops/{lid}/experiments", json=body).status_code == 202
    exp_ids = [e["id"] for e in srv.client.get(f"/v1/loops/{lid}/experiments").json()["items"]]
    wait_sample(srv, "ratchet_queue_depth", 2, loop="restart")
    srv.stop()

    again = server_factory(name="data")  # same data dir, fresh process, empty registry
    best = sample(again, "ratchet_loop_best_metric", loop="restart", metric="val_bpb")
    assert best == 0.5  # published from the database at start, before any experiment ran
    wait_sample(again, "ratchet_queue_depth", 2, loop="restart")
    assert sample(again, "ratchet_experiments_total", loop="restart", status="keep") == 0
    assert sample(again, "ratchet_experiments_running") == 0
    assert sample(again, "ratchet_slots_busy") == 0
    assert sample(again, "ratchet_build_info", version=VERSION, python=platform.python_version()) == 1

    again.client.post(f"/v1/loops/{lid}/stop")
    wait_sample(again, "ratchet_queue_depth", 0, loop="restart")
    text = again.client.get("/metrics").text
    leaked = [i for i in exp_ids if i in text]
    assert not leaked, f"experiment ids in metric labels: {leaked}"
