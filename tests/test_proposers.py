"""Loops that drive themselves, against a real service, real containers and real SQLite: a command
proposer (a script written for the test) in its own sandbox, proposers that misbehave, the network
a proposer may be given, and duplicates answered without a run."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import Server, settled_leftovers
from egress_net import PROBE, EgressNet
from proposer_scripts import IMPROVER, MISBEHAVING, NETWORKED_TAIL
from test_api import HARNESS, TRAIN, edit, make_loop, submit

pytestmark = pytest.mark.docker

SMALL = {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64}


def command(script: str, *args: str, **extra: object) -> dict:
    return {"kind": "command", "command": ["python3", "-c", script, *args], "resources": SMALL, **extra}


def wait_loop(srv: Server, loop_id: str, done, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loop = srv.client.get(f"/v1/loops/{loop_id}").json()
        if done(loop):
            return loop
        time.sleep(0.3)
    raise AssertionError(f"loop {loop_id} did not get there in {timeout} s: {loop}\n{srv.log()[-4000:]}")


def settled(loop: dict) -> bool:
    """Nothing runs or waits, and the proposer has stopped proposing."""
    c, p = loop["counts"], loop["proposer"]
    return (
        c["queued"] == c["running"] == c["confirming"] == 0
        and p["counts"]["running"] == p["counts"]["queued"] == 0
        and p["idle_reason"] is not None
    )


def proposals(srv: Server, loop_id: str) -> list[dict]:
    return srv.client.get(f"/v1/loops/{loop_id}/proposals", params={"limit": 1000}).json()["items"]


def experiments(srv: Server, loop_id: str) -> list[dict]:
    return srv.client.get(f"/v1/loops/{loop_id}/experiments", params={"limit": 1000}).json()["items"]


def metric_value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


@pytest.mark.timeout(600)
def test_a_command_proposer_drives_a_loop_of_20_experiments(server_factory, docker_client):
    srv = server_factory(slots=2)
    loop = make_loop(
        srv, name="driven", max_experiments=21, proposer=command(IMPROVER, parallel=2, timeout_s=60)
    )
    lid = loop["id"]
    loop = wait_loop(srv, lid, settled, timeout=420)
    assert loop["proposer"]["idle_reason"] == "max_experiments=21 reached"
    exps = experiments(srv, lid)
    assert len(exps) == 21 and exps[0]["kind"] == "baseline"
    candidates = exps[1:]
    # no REST submission: every candidate was made by a proposal of this loop, each by its own
    made = {p["experiment_id"]: p for p in proposals(srv, lid) if p["status"] == "proposed"}
    assert {e["proposal_id"] for e in candidates} == {made[e["id"]]["id"] for e in candidates}
    assert len(made) == 20
    assert all(e["status"] in ("keep", "discard") for e in candidates), [e["reason"] for e in candidates]
    assert loop["best_metric"] < 0.5 < 1.0 == exps[0]["metric"], loop["best_metric"]
    assert sum(e["status"] == "keep" for e in candidates) >= 3
    # the description came from description.txt's first line; the diff touches train.py only
    first = candidates[0]
    assert re.fullmatch(r"V 1\.0 -> [0-9.]+ \(x[0-9.]+\)", first["description"]), first["description"]
    diff = srv.client.get(f"/v1/experiments/{first['id']}/diff").text
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n") and "__pycache__" not in diff
    # the proposal's log went through the same log machinery: stored, and answered like an experiment's
    proposal = made[first["id"]]
    log = srv.client.get(f"/v1/proposals/{proposal['id']}/logs")
    assert log.status_code == 200 and log.headers["x-ratchet-status"] == "proposed"
    assert "context: loop.json program.md" not in log.text  # this workspace has no program.md
    assert "context: loop.json recent.json recent.md results.tsv" in log.text, log.text
    events = srv.client.get(f"/v1/proposals/{proposal['id']}/logs", params={"follow": "true"}).text
    assert "data: context:" in events and "event: end\r\ndata: proposed" in events
    shown = srv.client.get(f"/v1/proposals/{proposal['id']}").json()
    assert shown["parent"] == loop["root_snapshot"] and shown["attempts"] == 1 and shown["exit_code"] == 0
    # later proposals read the ledger and the recent experiments of their loop
    last = max(made.values(), key=lambda p: p["number"])
    assert "ledger rows: 0" not in srv.client.get(f"/v1/proposals/{last['id']}/logs").text
    # the proposer's own containers are gone
    assert settled_leftovers(docker_client, f"ratchet.loop={lid}") == []
    text = srv.client.get("/metrics").text
    assert (
        metric_value(text, "ratchet_proposals_total", loop="driven", kind="command", status="proposed") == 20
    )
    assert metric_value(text, "ratchet_proposals_running") == 0


MISBEHAVING_FILES = {"train.py": TRAIN, "prepare.py": HARNESS, "lib/model.py": "W = 1\n"}


@pytest.mark.timeout(300)
def test_misbehaving_proposers_are_counted_and_contained(server_factory, docker_client):
    srv = server_factory(slots=1)
    lp = make_loop(
        srv,
        name="unruly",
        workspace={"files": MISBEHAVING_FILES},
        editable=["train.py", "lib/model.py"],
        proposer=command(MISBEHAVING, timeout_s=4, max_failures=4),
    )
    lid = lp["id"]
    loop = wait_loop(srv, lid, lambda lp: lp["state"] == "paused", timeout=120)
    got = {p["number"]: p for p in proposals(srv, lid)}
    assert [got[n]["status"] for n in (1, 2, 3, 4)] == ["failed"] * 4, got
    assert "lib/notes.py is read-only in this loop, but the proposer created it" in got[1]["reason"]
    assert "harness write: PermissionError" in srv.client.get(f"/v1/proposals/{got[1]['id']}/logs").text
    assert got[2]["reason"] == "killed at its hard timeout of 4 s"
    assert got[3]["reason"] == "exited with code 3" and got[3]["exit_code"] == 3
    assert got[4]["reason"] == "the proposer changed no editable file"
    assert loop["state_reason"].startswith("proposer failed 4 times in a row; last: the proposer changed")
    assert loop["proposer"]["failure_streak"] == 4 and loop["proposer"]["counts"]["failed"] == 4
    assert [e["kind"] for e in experiments(srv, lid)] == ["baseline"]  # nothing of theirs ran
    assert srv.client.get("/readyz").status_code == 200
    text = srv.client.get("/metrics").text
    for reason in ("harness_edit", "timeout", "exit_nonzero", "no_change"):
        assert metric_value(text, "ratchet_proposer_failures_total", loop="unruly", reason=reason) == 1
    assert settled_leftovers(docker_client, f"ratchet.loop={lid}") == []

    # resuming starts a fresh streak; the proposer then makes candidates again
    r = srv.client.post(f"/v1/loops/{lid}/resume")
    assert r.status_code == 200 and r.json()["state_reason"] is None
    assert r.json()["proposer"]["failure_streak"] == 0
    wait_loop(srv, lid, lambda lp: lp["counts"]["keep"] >= 2, timeout=60)
    # the loop page shows the proposer's runs, its text escaped like every agent-written string
    page = srv.client.get(f"/loops/{lid}").text
    assert 'id="proposer"' in page and "killed at its hard timeout of 4 s" in page
    assert "&lt;script&gt;alert(5)&lt;/script&gt; V -&gt; 0.95" in page and "<script>alert" not in page
    srv.client.post(f"/v1/loops/{lid}/stop")
    loop = wait_loop(srv, lid, lambda lp: lp["proposer"]["counts"]["running"] == 0, timeout=60)
    assert loop["proposer"]["idle_reason"] == "loop stopped"


@pytest.fixture
def egress_net(docker_client):
    net = EgressNet(docker_client)
    yield net
    net.close()


@pytest.mark.timeout(300)
def test_a_proposer_reaches_its_allowed_endpoint_and_nothing_else(server_factory, egress_net, docker_client):
    net = egress_net
    srv = server_factory(slots=1, env={"RATCHET_PROPOSER_NETWORK": net.name})
    args = [net.gateway, str(net.gateway_port), str(net.loopback_port), net.server_ip]
    proposer = command(PROBE + NETWORKED_TAIL, *args, timeout_s=60, network={"allow": ["fakeapi:8000"]})
    lp = make_loop(srv, name="online", max_experiments=2, proposer=proposer)
    loop = wait_loop(srv, lp["id"], settled, timeout=180)
    (p,) = proposals(srv, lp["id"])
    assert p["status"] == "proposed", p
    log = srv.client.get(f"/v1/proposals/{p['id']}/logs").text
    out = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
    assert out["interfaces"] == ["lo"]
    assert out["allowed"] == "200 hello 8000 /v1/models"
    assert out["other_port"] == out["gateway_via_proxy"] == "403"
    assert out["connect_gateway"] == "HTTP/1.1 403 Forbidden"
    assert "CONNECTED" not in out["direct"].values(), out["direct"]
    assert "===== egress =====\nallow GET fakeapi:8000\ndeny GET fakeapi:8001\n" in log
    # its candidate ran with no network at all: neither the relay's port nor the endpoint
    cand = srv.client.get(f"/v1/experiments/{p['experiment_id']}").json()
    assert cand["status"] == "keep" and cand["metrics"]["reach"] == 0.0, cand
    assert loop["best_metric"] == 0.5
    assert settled_leftovers(docker_client, f"ratchet.loop={lp['id']}") == []


def test_a_networked_proposer_needs_runc(server):
    body = {
        "name": "gvisor-online",
        "workspace": {"files": {"train.py": TRAIN}},
        "runtime": "runsc",
        "resources": {"pids": 256},
        "proposer": {"kind": "command", "command": ["true"], "network": {"allow": ["api.example.com:443"]}},
    }
    r = server.client.post("/v1/loops", json=body)
    assert r.status_code == 422 and "needs the runc runtime" in r.json()["detail"]
    bad = {**body, "runtime": "runc", "proposer": command("pass", env={"RATCHET_X": "1"})}
    r = server.client.post("/v1/loops", json=bad)
    assert r.status_code == 422 and "RATCHET_*" in r.json()["detail"]
    assert server.client.get("/v1/loops").json() == []


def test_duplicates_are_answered_with_the_earlier_experiment(server):
    lp = make_loop(server, name="dups")
    lid = lp["id"]
    server.wait_idle(lid)
    base = experiments(server, lid)[0]
    first = submit(server, lid, "V 0.5", patch=edit("0.5"))
    assert first["duplicate_of"] is None
    again = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "again", "patch": edit("0.5")}
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"] == again.json()["duplicate_of"]
    assert again.json()["description"] == "V 0.5"  # the earlier experiment, not a new one
    server.wait_final(first["id"])
    # the same content sent as whole files against the root: still the same snapshot
    same = server.client.post(
        f"/v1/loops/{lid}/experiments",
        json={
            "description": "files",
            "files": {"train.py": TRAIN.replace("V = 1.0", "V = 0.5")},
            "parent": lp["root_snapshot"],
        },
    )
    assert same.status_code == 200 and same.json()["duplicate_of"] == first["id"]
    # back to the baseline's content: the baseline answers
    back = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "undo", "files": {"train.py": TRAIN}}
    )
    assert back.status_code == 200 and back.json()["duplicate_of"] == base["id"]
    assert len(experiments(server, lid)) == 2
    # rerun stays the deliberate way to run a snapshot again
    r = server.client.post(f"/v1/experiments/{first['id']}/rerun")
    assert r.status_code == 202 and r.json()["rerun_of"] == first["id"]
    assert len(experiments(server, lid)) == 3
    text = server.client.get("/metrics").text
    assert metric_value(text, "ratchet_duplicates_total", loop="dups", source="api") == 3


def test_a_proposer_that_repeats_itself_is_answered_without_runs(server_factory):
    # two choices only: from the best (0.5) the one move left is back to the baseline's 1.0; one
    # slot, so each proposal starts from the verdict of the one before
    server = server_factory(slots=1)
    search = {"kind": "search", "knobs": {"V": {"choices": [1.0, 0.5]}}, "max_failures": 3}
    lp = make_loop(server, name="repeats", proposer=search)
    loop = wait_loop(server, lp["id"], lambda lp: lp["state"] == "paused", timeout=120)
    got = proposals(server, lp["id"])
    assert [p["status"] for p in got] == ["proposed", "duplicate", "duplicate", "duplicate"], got
    exps = experiments(server, lp["id"])
    assert [(e["kind"], e["metric"]) for e in exps] == [("baseline", 1.0), ("candidate", 0.5)]
    assert {p["duplicate_of"] for p in got[1:]} == {exps[0]["id"]}
    assert "3 times in a row; last: duplicate of experiment" in loop["state_reason"]


@pytest.mark.timeout(600)
def test_proposals_start_from_the_baseline_when_asked(server_factory):
    # from the baseline (V = 1.0) the only moves are to 0.5 and 0.25; from the best they would
    # start from a kept candidate instead, so every parent being the root tells the two apart
    server = server_factory(slots=1)
    search = {"kind": "search", "knobs": {"V": {"choices": [1.0, 0.5, 0.25]}}, "max_failures": 3}
    lp = make_loop(server, name="from-baseline", proposer={**search, "start_from": "baseline"})
    loop = wait_loop(server, lp["id"], lambda lp: lp["state"] == "paused", timeout=240)
    root = loop["root_snapshot"]
    exps = [e for e in experiments(server, lp["id"]) if e["kind"] == "candidate"]
    assert exps and {e["parent"] for e in exps} == {root}, exps
    assert {e["metric"] for e in exps} <= {0.5, 0.25} and loop["best_snapshot"] != root
    assert {p["parent"] for p in proposals(server, lp["id"])} == {root}
    r = server.client.post("/v1/loops", json={**lp["config"], "proposer": {**search, "start_from": "worst"}})
    assert r.status_code in (400, 422) and "start_from" in r.text, r.text
