"""The container engine going away under a real service, through a proxy socket the test cuts (the
shared engine itself never stops): the experiments it breaks are `error`-class failures retried with
back-off, never a `crash` of the candidate; dispatch waits while the engine is gone; /readyz says so."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import settled_leftovers
from engineproxy import EngineProxy
from test_api import TRAIN, make_loop, submit


@pytest.fixture
def proxy() -> Iterator[EngineProxy]:
    # A short path of its own: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="ratchet-engine-") as tmp:
        p = EngineProxy(Path(tmp) / "docker.sock").start()
        yield p
        p.cut()


def _submit(srv, loop_id: str, v: float, sleep: float = 0.0) -> str:
    text = TRAIN.replace("V = 1.0", f"V = {v}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")
    text = text.replace("time.sleep(", "print('started', flush=True)\ntime.sleep(")
    return submit(srv, loop_id, f"V={v}", files={"train.py": text})["id"]


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_engine_outage_pauses_dispatch_and_retries(server_factory, docker_client, proxy):
    env = {"DOCKER_HOST": proxy.url, "RATCHET_ENGINE_RETRIES": "3", "RATCHET_ENGINE_BACKOFF_S": "0.5"}
    srv = server_factory(slots=1, env=env, name="outage")
    lid = make_loop(srv, name="outage")["id"]
    srv.wait_idle(lid)
    slow = _submit(srv, lid, 0.5, sleep=4.0)
    waiting = [_submit(srv, lid, 0.6), _submit(srv, lid, 0.4)]
    logs = f"/v1/experiments/{slow}/logs"
    _until(lambda: "started" in srv.client.get(logs).text, 60, "the slow candidate to run")

    proxy.cut()
    ready = _until(lambda: (r := srv.client.get("/readyz")).status_code == 503 and r, 30, "/readyz to fail")
    assert ready.json()["engine"] is False and ready.json()["database"] is True
    exp = _until(
        lambda: (e := srv.client.get(f"/v1/experiments/{slow}").json())["status"] == "queued" and e,
        30,
        "the broken run to go back to the queue",
    )
    assert exp["attempts"] == 1 and "container engine" in exp["reason"], exp
    # Several back-offs long: nothing is dispatched into the outage, so nothing turns into error.
    time.sleep(4)
    for exp_id in (slow, *waiting):
        exp = srv.client.get(f"/v1/experiments/{exp_id}").json()
        assert exp["status"] == "queued", exp
        assert exp["attempts"] == (1 if exp_id == slow else 0), exp
    assert "dispatch paused" in srv.log()

    proxy.restore()
    _until(lambda: srv.client.get("/readyz").status_code == 200, 30, "/readyz to recover")
    srv.wait_idle(lid, timeout=120)
    done = {e: srv.client.get(f"/v1/experiments/{e}").json() for e in (slow, *waiting)}
    assert {e["status"] for e in done.values()} <= {"keep", "discard"}, done
    assert [done[e]["attempts"] for e in (slow, *waiting)] == [2, 1, 1]
    assert done[slow]["metric"] == 0.5
    # The container the outage cut off (still running on the engine) was removed once it came back.
    assert not settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")


def test_engine_failures_end_as_error_after_the_retries(server_factory, docker_client, proxy):
    env = {"DOCKER_HOST": proxy.url, "RATCHET_ENGINE_RETRIES": "2", "RATCHET_ENGINE_BACKOFF_S": "0.2"}
    srv = server_factory(slots=1, env=env, name="flaky")
    lid = make_loop(srv, name="flaky")["id"]
    srv.wait_idle(lid)
    proxy.cut_attach_after = 1.5  # every run loses its output stream; pings and the rest still work
    exp_id = _submit(srv, lid, 0.5, sleep=30.0)
    exp = srv.wait_final(exp_id, timeout=120)
    assert exp["status"] == "error", exp  # the infrastructure failed, not the candidate
    assert exp["attempts"] == 3
    # The cut lands on the running workload's stream, or (a loaded machine opening the gate later
    # than 1.5 s after attaching) on the gate's: an engine failure either way.
    cut = ("lost the run's output stream", "open gate: engine unreachable")
    assert any(c in exp["reason"] for c in cut) and "after 3 attempts" in exp["reason"], exp
    assert srv.client.get("/readyz").status_code == 200
    proxy.cut_attach_after = None
    again = _submit(srv, lid, 0.25)
    assert srv.wait_final(again)["status"] == "keep"
    assert not settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")


def _engine_up(srv) -> float | None:
    for line in srv.client.get("/metrics").text.splitlines():
        if line.startswith("ratchet_engine_up "):
            return float(line.split()[1])
    return None


def test_a_hung_engine_flips_readiness_within_seconds(server_factory, proxy):
    """An engine that accepts connections and never answers: the ping gives up after a few seconds
    (not the client's 60 s timeout for long calls), /readyz says so and `ratchet_engine_up` drops."""
    srv = server_factory(slots=1, env={"DOCKER_HOST": proxy.url}, name="hung")
    _until(lambda: _engine_up(srv) == 1, 15, "ratchet_engine_up to be 1")
    proxy.hang()
    began = time.monotonic()
    ready = _until(lambda: (r := srv.client.get("/readyz")).status_code == 503 and r, 30, "/readyz to fail")
    took = time.monotonic() - began
    assert ready.json()["engine"] is False and ready.json()["database"] is True
    assert took < 10, f"readiness took {took:.1f} s to notice the hung engine"
    _until(lambda: _engine_up(srv) == 0, 15, "ratchet_engine_up to be 0")
    proxy.restore()
    _until(lambda: srv.client.get("/readyz").status_code == 200, 15, "/readyz to recover")
    _until(lambda: _engine_up(srv) == 1, 15, "ratchet_engine_up to be 1 again")
