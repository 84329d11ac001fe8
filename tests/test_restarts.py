"""kill -9 of a real service at random and at chosen points, restarted on the same data dir: no
experiment is lost, judged twice or run again once its result was written, and the ledger, the best
and the snapshots agree. The chosen points use the test-only RATCHET_FAULT_POINT hook
(service/faults.py); the seed is printed and can be replayed with RATCHET_CRASH_SEED."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import docker
import httpx
import pytest
from conftest import Server, settled_leftovers
from test_api import TRAIN, make_loop

POINTS = (
    "run.preparing",  # running in the database, no container yet
    "run.prepared",  # container up behind its gate
    "run.output",  # the workload runs and prints (the next start takes it over)
    "run.exited",  # the workload ended, its outputs not collected (taken over too)
    "decide.before",  # log written, verdict not
    "decide.before_commit",  # inside the verdict's transaction
    "decide.after",  # verdict committed, nothing else done
    "snapshot.blob_tmp",  # a new blob fsynced under its temporary name
    "submit.before_commit",  # a candidate's blobs durable, its rows not committed
)
START_LAG_S = 10.0
FINAL_FIELDS = ("status", "metric", "reason", "finished_at", "attempts")


def _candidate(v: float, sleep: float) -> dict:
    text = TRAIN.replace("V = 1.0", f"V = {v:.6f}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")
    return {"description": f"V={v:.6f}", "files": {"train.py": text}}


def _experiments(srv: Server, loop_id: str) -> list[dict]:
    r = srv.client.get(f"/v1/loops/{loop_id}/experiments", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["items"]


class Crasher:
    def __init__(self, srv: Server, loop_id: str, rng: random.Random) -> None:
        self.srv, self.loop_id, self.rng = srv, loop_id, rng
        self.crashes: list[float] = []  # when each death was seen
        self.accepted: set[str] = set()  # submissions answered 202
        self.unanswered = 0  # submissions cut off by a crash: stored or not, never half
        self.finals: dict[str, tuple[float, dict]] = {}  # first seen final: (when, fields)
        self.used: set[float] = set()

    def start(self, point: str | None) -> bool:
        """Starts the service; True when the point fired (and it died) while it was starting."""
        env = self.srv.extra_env
        env.pop("RATCHET_FAULT_POINT", None)
        if point:
            env["RATCHET_FAULT_POINT"] = point
        try:
            self.srv.start()
        except RuntimeError:  # the point fired while the service was still starting
            assert self.srv.proc is not None and self.srv.proc.returncode == -signal.SIGKILL
            self.crashes.append(time.time())
            return True
        self.observe()
        return False

    def observe(self) -> None:
        now = time.time()
        try:
            exps = _experiments(self.srv, self.loop_id)
        except httpx.TransportError:  # a point fired meanwhile
            return
        for e in exps:
            if e["status"] not in ("queued", "running") and e["id"] not in self.finals:
                self.finals[e["id"]] = (now, {k: e[k] for k in FINAL_FIELDS})

    def submit(self) -> None:
        v = round(self.rng.uniform(0.05, 1.5), 6)
        while v in self.used:
            v = round(v + 0.000001, 6)
        self.used.add(v)
        body = _candidate(v, self.rng.choice([0.0, 0.0, 0.3, 1.0]))
        try:
            r = self.srv.client.post(f"/v1/loops/{self.loop_id}/experiments", json=body, timeout=30)
        except httpx.TransportError:
            self.unanswered += 1
            return
        assert r.status_code == 202, r.text
        self.accepted.add(r.json()["id"])

    def dead(self, within: float) -> bool:
        assert self.srv.proc is not None
        try:
            self.srv.proc.wait(timeout=within)
            return True
        except Exception:
            return False

    def kill(self) -> None:
        self.srv.stop(kill=True)
        self.crashes.append(time.time())

    def wait_running(self, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                loop = self.srv.client.get(f"/v1/loops/{self.loop_id}").json()
            except httpx.TransportError:
                return
            if loop["counts"]["running"]:
                return
            time.sleep(0.05)


def _round(c: Crasher, kind: str) -> str:
    """One crash; returns what actually happened (a point not reached in time becomes a kill)."""
    rng = c.rng
    if kind in POINTS:
        point = f"{kind}@{rng.choice([1, 1, 2])}"
        if c.start(point):
            return f"{point} (while starting)"
        for _ in range(3 if kind.startswith(("snapshot", "submit")) else rng.randint(1, 2)):
            c.submit()
        if c.dead(within=20):
            c.crashes.append(time.time())
            assert c.srv.proc is not None and c.srv.proc.returncode == -signal.SIGKILL, c.srv.log()[-2000:]
            return point
        c.kill()
        return f"{point} (not reached: kill -9)"
    c.start(None)
    for _ in range(rng.randint(1, 2)):
        c.submit()
    if kind == "running":
        c.wait_running(within=10)
    delay = rng.uniform(0, 2.0 if kind == "running" else 0.5)
    time.sleep(delay)
    c.kill()
    return f"kill -9 after {delay:.2f} s ({kind})"


def _watch_starts(client: docker.DockerClient) -> list[dict]:
    """Every start of a Ratchet container from now on, as the engine reports it. Streamed live: the
    engine keeps only its last 256 events, and other tests share it."""
    seen: list[dict] = []
    stream = client.events(
        decode=True, filters={"type": "container", "event": "start", "label": "ratchet.experiment"}
    )

    def pump() -> None:
        for ev in stream:
            seen.append(ev["Actor"]["Attributes"] | {"time": ev["timeNano"] / 1e9})

    threading.Thread(target=pump, daemon=True).start()
    return seen


def _replay(exps: list[dict]) -> tuple[list[dict], dict | None]:
    """The loop's rules over the ledger order: keep iff strictly better (min_delta 0, minimize)."""
    decided = sorted((e for e in exps if e["status"] in ("keep", "discard")), key=lambda e: e["finish_seq"])
    best: dict | None = None
    for e in decided:
        expected = "keep" if best is None or e["metric"] < best["metric"] else "discard"
        assert e["status"] == expected, f"experiment #{e['number']} is {e['status']}, rules say {expected}"
        if expected == "keep":
            best = e
    return decided, best


@pytest.mark.timeout(900)
def test_kill_9_at_random_and_chosen_points_loses_nothing(server_factory, docker_client):
    seed = int(os.environ.get("RATCHET_CRASH_SEED", random.randrange(2**32)))
    print(f"crash seed: {seed} (replay with RATCHET_CRASH_SEED={seed})")
    rng = random.Random(seed)
    started = _watch_starts(docker_client)
    # The engine's container starts stand for workload starts here, so nothing is prepared ahead
    # (a prepared container starts behind its gate before its experiment does; tests/test_pipeline.py
    # covers those across a kill -9).
    srv = server_factory(slots=2, name="crashy", env={"RATCHET_PREPARE_AHEAD": "0"})
    loop = make_loop(srv, name="crashy", timeout_s=30)
    lid = loop["id"]
    c = Crasher(srv, lid, rng)
    c.submit()
    c.kill()
    plan = [*POINTS, *POINTS, *["queued"] * 3, *["running"] * 4]
    rng.shuffle(plan)
    for i, kind in enumerate(plan, 1):
        began = time.monotonic()
        what = _round(c, kind)
        print(f"crash {i:2d}/{len(plan)}: {what} [{time.monotonic() - began:.1f} s]")
    began = time.monotonic()

    c.start(None)
    final_loop = srv.wait_idle(lid, timeout=300)
    print(f"final restart and the rest of the queue: {time.monotonic() - began:.1f} s")
    exps = _experiments(srv, lid)
    by_id = {e["id"]: e for e in exps}

    # Nothing lost, nothing half-stored; every experiment ended in exactly one final verdict.
    assert c.accepted <= set(by_id), "a submission answered 202 is missing"
    assert len(exps) <= 1 + len(c.accepted) + c.unanswered
    assert {e["status"] for e in exps} <= {"keep", "discard"}, [(e["number"], e["reason"]) for e in exps]
    # A written result is never redone: whatever was final after a restart is unchanged at the end.
    for exp_id, (_, fields) in c.finals.items():
        assert {k: by_id[exp_id][k] for k in FINAL_FIELDS} == fields, f"experiment {exp_id} changed"

    # The ledger: one row per decided experiment, finishing order without gaps, the rules replayed.
    tsv = srv.client.get(f"/v1/loops/{lid}/results.tsv").text.splitlines()[1:]
    commits = [row.split("\t")[0] for row in tsv]
    assert len(commits) == len(set(commits)) == len(exps), "a ledger row is missing or repeated"
    order = {commit: n for n, commit in enumerate(commits, 1)}
    for e in exps:
        e["finish_seq"] = order[e["commit"]]
    decided, best = _replay(exps)
    assert [row.split("\t")[3] for row in tsv] == [e["status"] for e in decided]
    assert best is not None
    assert (final_loop["best_experiment"], final_loop["best_snapshot"], final_loop["best_metric"]) == (
        best["id"],
        best["snapshot"],
        best["metric"],
    )
    snaps = srv.client.get(f"/v1/loops/{lid}/snapshots").json()
    kept = [e["id"] for e in reversed(decided) if e["status"] == "keep"]
    assert [s["experiment_id"] for s in snaps] == kept
    archive = srv.client.get(f"/v1/snapshots/{best['snapshot']}/archive")
    assert archive.status_code == 200

    # None ran twice unless a crash cut its run short before its result was written.
    time.sleep(1)  # the last events on their way
    starts: dict[str, list[tuple[float, int]]] = {}
    for ev in started:
        if ev.get("ratchet.sandbox") == srv.instance:
            starts.setdefault(ev["ratchet.experiment"], []).append((ev["time"], int(ev["ratchet.attempt"])))
    reruns = 0
    for e in exps:
        runs = sorted(starts.get(e["id"], []))
        tries = [attempt for _, attempt in runs]
        assert tries, f"experiment #{e['number']} has a verdict but its container never started"
        # An attempt begins only with queued -> running, and a running experiment goes back to the
        # queue only when a restart finds it unfinished: no attempt may run twice.
        assert len(set(tries)) == len(tries), f"#{e['number']} ran twice in one attempt: {runs}"
        assert max(tries) <= e["attempts"]
        # A start asked for just before a kill can be reported a little after it: allow for that.
        later = [t for t in c.crashes if t > runs[0][0] - START_LAG_S]
        assert e["attempts"] - 1 <= len(later), f"#{e['number']}: {e['attempts']} tries, {len(later)} crashes"
        if e["id"] in c.finals:
            seen_final = c.finals[e["id"]][0]
            assert all(t < seen_final for t, _ in runs), f"#{e['number']} ran again after its verdict"
        reruns += len(runs) - 1
    print(f"{len(exps)} experiments, {len(c.crashes)} crashes, {reruns} run(s) redone after a crash")
    assert len(c.crashes) >= 20
    # Containers of every dead instance were removed by the restarts that followed.
    assert not settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")
