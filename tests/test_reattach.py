"""A restarted service takes over the runs its previous process left alive (service/runs/adoption.py,
sandbox/adopt.py): a real service is killed with SIGKILL while experiments run and started again on
the same data dir. Each run goes on in its container; the new process follows it from where it is,
judges it once, and its experiment keeps one attempt, its own start and the whole of its log."""

from __future__ import annotations

import contextlib
import signal
import time

import httpx
import pytest
from conftest import Server, settled_leftovers
from test_api import make_loop, submit
from test_restarts import _watch_starts

pytestmark = pytest.mark.docker

# Prints a numbered line every 0.25 s for `N` lines (N / 4 seconds), then the summary block.
TICKING = (
    "import sys, time\n"
    "V = 1.0\n"
    "N = 24\n"
    "for i in range(N):\n"
    "    print(f'line {i}', flush=True)\n"
    "    sys.stderr.write(f'progress {i}\\n'); sys.stderr.flush()\n"
    "    time.sleep(0.25)\n"
    "print('---')\n"
    "print(f'val_bpb: {V:.6f}')\n"
)


def ticking(v: float, n: int = 24) -> dict[str, str]:
    return {"train.py": TICKING.replace("V = 1.0", f"V = {v}").replace("N = 24", f"N = {n}")}


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def printed(srv: Server, exp_id: str) -> str:
    return srv.client.get(f"/v1/experiments/{exp_id}/logs").text


def lines_once_in_order(log: str, n: int) -> None:
    out = [x for x in log.splitlines() if x.startswith("line ")]
    err = [x for x in log.splitlines() if x.startswith("progress ")]
    assert out == [f"line {i}" for i in range(n)], log
    assert err == [f"progress {i}" for i in range(n)], log


def starts_of(events: list[dict], srv: Server) -> dict[str, list[int]]:
    time.sleep(1)  # the last events on their way
    starts: dict[str, list[int]] = {}
    for ev in events:
        if ev.get("ratchet.sandbox") == srv.instance:
            starts.setdefault(ev["ratchet.experiment"], []).append(int(ev["ratchet.attempt"]))
    return starts


@pytest.mark.timeout(300)
def test_kill_9_while_three_run_takes_them_over(server_factory, docker_client):
    srv = server_factory(slots=3, name="three")
    loop = make_loop(srv, name="three", workspace={"files": ticking(1.0, n=2)}, timeout_s=60)
    srv.wait_idle(loop["id"])
    events = _watch_starts(docker_client)
    exps = [submit(srv, loop["id"], f"v{v}", files=ticking(v))["id"] for v in (0.9, 0.8, 0.7)]
    for exp_id in exps:  # all three have printed a few lines: well into their run
        wait_for(f"{exp_id} to print", lambda e=exp_id: "line 3" in printed(srv, e))
    before = {e: srv.client.get(f"/v1/experiments/{e}").json() for e in exps}
    assert all(b["status"] == "running" for b in before.values())
    srv.stop(kill=True)
    killed_at = time.time()
    assert docker_client.api.containers(filters={"label": f"ratchet.sandbox={srv.instance}"})
    time.sleep(1.0)
    srv.start()
    for exp_id in exps:
        final = srv.wait_final(exp_id, timeout=60)
        assert final["status"] in ("keep", "discard"), final
        assert final["attempts"] == 1, final
        assert final["started_at"] == before[exp_id]["started_at"]  # the same run, not a new start
        # One run of 24 lines at 0.25 s: 6 s, not the part before the kill plus a rerun.
        assert 5.9 <= final["workload_seconds"] < 8.0, final
        assert final["finished_at"] - final["started_at"] < 10.0
        assert final["finished_at"] > killed_at
        lines_once_in_order(printed(srv, exp_id), 24)
    assert starts_of(events, srv) == {e: [1] for e in exps}, "a run was started again"
    assert "3 run(s) taken over, 0 requeued" in srv.log()
    final_loop = srv.wait_idle(loop["id"])
    assert final_loop["best_metric"] == pytest.approx(0.7)
    assert not settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")


def killed_at_point(srv: Server, point: str, files: dict[str, str]) -> None:
    """Creates a loop (its baseline runs at once) on a service that SIGKILLs itself at `point`."""
    with contextlib.suppress(httpx.TransportError):  # it may die while answering
        make_loop(srv, name=point, workspace={"files": files})
    assert srv.proc is not None
    srv.proc.wait(timeout=60)
    assert srv.proc.returncode == -signal.SIGKILL
    srv.extra_env.pop("RATCHET_FAULT_POINT")


def test_a_run_that_ended_during_the_restart_is_judged_as_it_ran(server_factory):
    """Killed the moment the workload ended, its outputs not collected: the gate holds the
    container until the next process collects it."""
    srv = server_factory(slots=1, name="ended", env={"RATCHET_FAULT_POINT": "run.exited"})
    killed_at_point(srv, "run.exited", ticking(1.0, n=8))
    time.sleep(2.0)
    srv.start()
    loop = srv.client.get("/v1/loops").json()[0]
    srv.wait_idle(loop["id"])
    exp = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert exp["status"] == "keep" and exp["attempts"] == 1, exp
    assert 1.9 <= exp["workload_seconds"] < 3.0, exp  # its own run, not the time the service was away
    lines_once_in_order(printed(srv, exp["id"]), 8)


def test_a_run_prepared_behind_its_gate_is_taken_over_and_let_go(server_factory):
    srv = server_factory(slots=1, name="gated", env={"RATCHET_FAULT_POINT": "run.prepared"})
    killed_at_point(srv, "run.prepared", ticking(1.0, n=4))
    srv.start()
    loop = srv.client.get("/v1/loops").json()[0]
    final = srv.wait_idle(loop["id"])
    exp = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert final["baseline"] == "ok" and exp["attempts"] == 1, exp
    assert "1 run(s) taken over" in srv.log()
    lines_once_in_order(printed(srv, exp["id"]), 4)


def test_a_run_past_its_deadline_when_the_service_returns_is_a_timeout(server_factory):
    srv = server_factory(slots=1, name="late")
    loop = make_loop(srv, name="late", workspace={"files": ticking(1.0, n=2)}, time_budget_s=2, timeout_s=3)
    srv.wait_idle(loop["id"])
    exp_id = submit(srv, loop["id"], "slow", files=ticking(0.5, n=40))["id"]  # 10 s: past its 3 s
    wait_for("it to print", lambda: "line 1" in printed(srv, exp_id))
    srv.stop(kill=True)
    time.sleep(4.0)
    srv.start()
    final = srv.wait_final(exp_id)
    assert final["status"] == "timeout" and final["attempts"] == 1, final
    assert "line 20" not in printed(srv, exp_id)  # nothing of what it printed past its deadline


def test_a_run_whose_container_is_gone_is_run_again(server_factory, docker_client):
    srv = server_factory(slots=1, name="gone")
    loop = make_loop(srv, name="gone", workspace={"files": ticking(1.0, n=2)})
    srv.wait_idle(loop["id"])
    exp_id = submit(srv, loop["id"], "v", files=ticking(0.5, n=12))["id"]
    wait_for("it to print", lambda: "line 1" in printed(srv, exp_id))
    srv.stop(kill=True)
    for c in docker_client.api.containers(filters={"label": f"ratchet.experiment={exp_id}"}):
        docker_client.api.remove_container(c["Id"], force=True)
    srv.start()
    final = srv.wait_final(exp_id)
    assert final["status"] == "keep" and final["attempts"] == 2, final
    lines_once_in_order(printed(srv, exp_id), 12)


def test_with_reattach_off_a_restart_runs_them_again(server_factory):
    srv = server_factory(slots=1, name="off", env={"RATCHET_REATTACH": "false"})
    loop = make_loop(srv, name="off", workspace={"files": ticking(1.0, n=2)})
    srv.wait_idle(loop["id"])
    exp_id = submit(srv, loop["id"], "v", files=ticking(0.5, n=12))["id"]
    wait_for("it to print", lambda: "line 1" in printed(srv, exp_id))
    srv.stop(kill=True)
    srv.start()
    final = srv.wait_final(exp_id)
    assert final["status"] == "keep" and final["attempts"] == 2, final
    lines_once_in_order(printed(srv, exp_id), 12)


def test_with_detach_on_stop_a_graceful_stop_leaves_runs_for_the_next_start(server_factory, docker_client):
    """An upgrade: SIGTERM, then the new version on the same data dir. The training run goes on
    through the stop and is taken over, instead of being killed and run again."""
    srv = server_factory(slots=1, name="upgrade", env={"RATCHET_DETACH_ON_STOP": "true"})
    loop = make_loop(srv, name="upgrade", workspace={"files": ticking(1.0, n=2)})
    srv.wait_idle(loop["id"])
    exp_id = submit(srv, loop["id"], "v", files=ticking(0.5, n=16))["id"]
    wait_for("it to print", lambda: "line 2" in printed(srv, exp_id))
    srv.stop()  # graceful
    assert "left running for the next start" in srv.log()
    label = f"ratchet.experiment={exp_id}"
    assert docker_client.api.containers(filters={"label": label, "status": "running"})
    srv.start()
    final = srv.wait_final(exp_id)
    assert final["status"] == "keep" and final["attempts"] == 1, final
    assert 3.9 <= final["workload_seconds"] < 6.0, final
    lines_once_in_order(printed(srv, exp_id), 16)
