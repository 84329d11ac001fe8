"""Live logs against a real service and real containers: `GET /v1/experiments/{id}/logs?follow=true`
streams server-sent events while the experiment runs, ends with its final status, stays prompt,
and keeps the service's memory bounded whatever a workload prints."""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import SANDBOX_IMAGE, leftovers
from test_api import make_loop

from sandbox import Limits, RunSpec, Sandbox

pytestmark = pytest.mark.docker

MiB = 1024 * 1024
REPORT = "__RATCHET_DONE__"
SKIPPED = re.compile(r"\n\[ratchet: (\d+) bytes of output skipped here\]\n")


@dataclass
class Event:
    kind: str  # "message", "end", ... or "comment"
    data: str
    at: float  # time.time() when it arrived


@dataclass
class Followed:
    status_code: int
    events: list[Event] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.data for e in self.events if e.kind == "message")

    @property
    def end(self) -> str | None:
        ends = [e.data for e in self.events if e.kind == "end"]
        assert len(ends) <= 1, ends
        return ends[0] if ends else None

    @property
    def comments(self) -> list[str]:
        return [e.data for e in self.events if e.kind == "comment"]


def sse_events(lines: Iterator[str]) -> Iterator[Event]:
    """A plain reading of the SSE format: `data` lines join with LF, a blank line dispatches."""
    data: list[str] = []
    kind = "message"
    for line in lines:
        if line == "":
            if data:
                yield Event(kind, "\n".join(data), time.time())
            data, kind = [], "message"
            continue
        if line.startswith(":"):
            yield Event("comment", line[1:].strip(), time.time())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value


def follow(url: str, exp_id: str, on_event=None, timeout: float = 120) -> Followed:
    with (
        httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, read=30)) as client,
        client.stream("GET", f"/v1/experiments/{exp_id}/logs", params={"follow": "true"}) as r,
    ):
        out = Followed(r.status_code)
        if r.status_code != 200:
            r.read()
            return out
        assert r.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(r.iter_lines()):
            out.events.append(event)
            if on_event is not None:
                on_event(event)
        return out


def baseline_id(server, loop: dict) -> str:
    return server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]["id"]


def files(train: str) -> dict:
    return {"files": {"train.py": train, "prepare.py": "SECRET = 1\n"}}


TICKER = """\
import sys, time
for i in range(15):
    out = sys.stdout if i % 2 == 0 else sys.stderr
    print(f"line {i} printed {time.time():.6f}", file=out, flush=True)
    time.sleep(0.2)
print("---")
print("val_bpb: 1.0", flush=True)
"""
SLEEPER = """\
import time
print("started", flush=True)
time.sleep({seconds})
print("---")
print("val_bpb: 1.0")
"""
LINE = re.compile(r"^line (\d+) printed (\d+\.\d+)$")


def test_follow_from_queued_streams_every_line_in_order_within_half_a_second(server_factory):
    server = server_factory(slots=1)
    blocker = make_loop(server, name="blocker", workspace=files(SLEEPER.format(seconds=2)))
    ticker = make_loop(server, name="ticker", workspace=files(TICKER))
    exp_id = baseline_id(server, ticker)
    assert server.client.get(f"/v1/experiments/{exp_id}").json()["status"] == "queued"

    live_tails: list[str] = []
    stop_polling = threading.Event()

    def poll_live_views() -> None:  # the plain views show the newest output while it runs
        while not stop_polling.wait(0.3):
            exp = server.client.get(f"/v1/experiments/{exp_id}").json()
            if exp["status"] == "running" and exp["log_tail"]:
                plain = server.client.get(f"/v1/experiments/{exp_id}/logs")
                live_tails.append(exp["log_tail"] + "\x00" + plain.text)

    poller = threading.Thread(target=poll_live_views)
    poller.start()
    try:
        got = follow(server.url, exp_id)
    finally:
        stop_polling.set()
        poller.join()

    assert got.status_code == 200
    assert got.end == "keep"
    assert got.events[-1].kind == "end"
    assert REPORT not in got.text
    # Every line once, in order, each timed by the clock the container shares with this host.
    arrivals: dict[int, float] = {}
    pending = ""
    for event in got.events:
        if event.kind != "message":
            continue
        pending += event.data
        *complete, pending = pending.split("\n")
        for line in complete:
            m = LINE.match(line)
            if m:
                assert int(m.group(1)) not in arrivals, f"line {m.group(1)} twice"
                arrivals[int(m.group(1))] = event.at - float(m.group(2))
    assert list(arrivals) == list(range(15))
    latencies = sorted(arrivals.values())
    p50, worst = statistics.median(latencies), latencies[-1]
    print(f"\nlive log latency, {len(latencies)} lines: p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert min(latencies) > -0.05, "a line arrived before it was printed: clocks disagree"
    assert worst < 0.5, latencies

    # The stream carried exactly what the stored log holds.
    stored = server.client.get(f"/v1/experiments/{exp_id}/logs").text
    assert got.text == stored.replace("\r\n", "\n")
    assert live_tails, "never saw the live tail while the experiment ran"
    tail, plain = live_tails[-1].split("\x00")
    assert "line " in tail and REPORT not in tail
    assert plain.startswith("line 0 printed") and tail in plain and REPORT not in plain
    assert server.client.get(f"/v1/experiments/{baseline_id(server, blocker)}").json()["status"] == "keep"


def test_follow_of_a_finished_experiment_sends_the_whole_log_and_the_end(server):
    train = (
        "import sys\nprint('a\\nb')\nprint('to stderr', file=sys.stderr)\n"
        "print('---')\nprint('val_bpb: 2.5')\n"
    )
    loop = make_loop(server, workspace=files(train))
    exp_id = baseline_id(server, loop)
    assert server.wait_final(exp_id)["status"] == "keep"
    got = follow(server.url, exp_id)
    stored = server.client.get(f"/v1/experiments/{exp_id}/logs").text
    assert "val_bpb: 2.5" in stored and "to stderr" in stored
    assert got.text == stored
    assert [e.kind for e in got.events][-1] == "end" and got.end == "keep"
    assert REPORT not in got.text


def test_follow_of_an_unknown_or_malformed_id_is_refused(server):
    missing = follow(server.url, "0123456789abcdef")
    assert missing.status_code == 404 and not missing.events
    r = server.client.get("/v1/experiments/0123456789abcdef/logs", params={"follow": "true"})
    assert r.status_code == 404 and "0123456789abcdef" in r.json()["detail"]
    assert server.client.get("/v1/experiments/nope/logs", params={"follow": "true"}).status_code == 400
    bad = server.client.get("/v1/experiments/0123456789abcdef/logs", params={"follow": "maybe"})
    assert bad.status_code == 400


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


FLOOD_MB = 200
FLOOD = f"""\
import sys
block = ("x" * 1023 + "\\n") * 1024
for _ in range({FLOOD_MB}):
    sys.stdout.write(block)
sys.stdout.flush()
print("---")
print("val_bpb: 1.0")
"""


def test_a_flood_keeps_the_service_memory_bounded_and_the_follower_informed(server):
    assert server.proc is not None
    loop = make_loop(server, name="warmup")  # warm the service up before the baseline reading
    server.wait_idle(loop["id"])
    follow(server.url, baseline_id(server, loop))
    before = vm_rss(server.proc.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], vm_rss(server.proc.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = skipped = events = 0
    views: list = []  # the plain views, taken mid-flood
    try:
        flood = make_loop(server, name="flood", workspace=files(FLOOD), timeout_s=120)
        exp_id = baseline_id(server, flood)

        def count(event: Event) -> None:
            nonlocal received, skipped, events
            if event.kind == "message":
                events += 1
                assert REPORT not in event.data
                gaps = [int(n) for n in SKIPPED.findall(event.data)]
                skipped += sum(gaps)
                received += len(SKIPPED.sub("", event.data))
                if received + skipped > 8 * MiB and not views:
                    views.append(server.client.get(f"/v1/experiments/{exp_id}").json())
                    views.append(server.client.get(f"/v1/experiments/{exp_id}/logs").text)

        got = follow(server.url, exp_id, on_event=count, timeout=180)
    finally:
        done.set()
        sampler.join()
    after = vm_rss(server.proc.pid)
    total = FLOOD_MB * MiB + len("---\nval_bpb: 1.0\n")
    print(
        f"\nflood of {FLOOD_MB} MiB: follower got {received / MiB:.1f} MiB in {events} events, told of"
        f" {skipped / MiB:.1f} MiB skipped; server RSS {before / MiB:.0f} -> peak {peak[0] / MiB:.0f}"
        f" -> {after / MiB:.0f} MiB"
    )
    assert got.end == "keep"
    assert received + skipped == total  # every byte either arrived or was counted as skipped
    assert peak[0] - before < 64 * MiB, (before, peak[0])
    stored = server.client.get(f"/v1/experiments/{exp_id}/logs").text
    assert "bytes of output dropped here" in stored and len(stored) < 5 * MiB
    exp, plain = views
    assert exp["status"] == "running", "the flood ended before the views were taken"
    assert 0 < len(exp["log_tail"]) <= 4096 and set(exp["log_tail"]) <= {"x", "\n"}
    gap = SKIPPED.match(plain)
    assert gap and int(gap.group(1)) > 0 and len(plain) - gap.end() == 1 * MiB  # the newest MiB, marked


def test_cancel_ends_the_stream_and_a_queued_follower_gets_keepalives(server_factory):
    server = server_factory(slots=1)
    running = baseline_id(server, make_loop(server, name="a", workspace=files(SLEEPER.format(seconds=60))))
    queued = baseline_id(server, make_loop(server, name="b", workspace=files(SLEEPER.format(seconds=60))))
    queued_follow: list[Followed] = []
    waiter = threading.Thread(target=lambda: queued_follow.append(follow(server.url, queued)))
    waiter.start()
    started = threading.Event()

    def on_event(event: Event) -> None:
        if "started" in event.data and not started.is_set():
            started.set()

    def cancel_later() -> None:
        assert started.wait(60)
        time.sleep(10.5)  # long enough for the queued follower's keep-alive
        assert server.client.post(f"/v1/experiments/{queued}/cancel").status_code == 200
        assert server.client.post(f"/v1/experiments/{running}/cancel").status_code == 200

    canceller = threading.Thread(target=cancel_later)
    canceller.start()
    got = follow(server.url, running, on_event=on_event)
    canceller.join()
    waiter.join(timeout=30)
    assert got.text.startswith("started\n") and got.end == "cancelled"
    assert queued_follow and queued_follow[0].end == "cancelled"
    assert "keep-alive" in queued_follow[0].comments and queued_follow[0].text == ""


def test_stopping_the_service_ends_followers_at_once(server):
    exp_id = baseline_id(server, make_loop(server, workspace=files(SLEEPER.format(seconds=60))))
    started = threading.Event()
    result: list[Followed] = []

    def on_event(event: Event) -> None:
        if "started" in event.data:
            started.set()

    follower = threading.Thread(target=lambda: result.append(follow(server.url, exp_id, on_event=on_event)))
    follower.start()
    assert started.wait(60)
    assert_disconnects_leave_nothing(server, exp_id)
    t0 = time.monotonic()
    server.stop()
    follower.join(timeout=30)
    took = time.monotonic() - t0
    assert result, "the follower did not end cleanly"
    assert result[0].end is None and "service stopping" in result[0].comments
    assert took < 15, f"stopping took {took:.1f} s with a follower attached"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_disconnects_leave_nothing(server, exp_id: str) -> None:
    """Followers that hang up mid-stream: their connections are closed on the server's side too."""
    assert server.proc is not None
    before = open_fds(server.proc.pid)
    for _ in range(20):
        with httpx.stream("GET", f"{server.url}/v1/experiments/{exp_id}/logs?follow=true", timeout=30) as r:
            assert next(sse_events(r.iter_lines())).data == "started\n"
    deadline = time.monotonic() + 10
    while open_fds(server.proc.pid) > before:
        assert time.monotonic() < deadline, (before, open_fds(server.proc.pid))
        time.sleep(0.1)


# -- the sandbox's output callback -----------------------------------------------------------------


@pytest.fixture
def sandbox(docker_client) -> Iterator[Sandbox]:
    instance = f"test-live-{uuid.uuid4().hex[:8]}"
    yield Sandbox(docker_client, instance=instance)
    assert not leftovers(docker_client, f"ratchet.sandbox={instance}")


def spec(code: str) -> RunSpec:
    return RunSpec(image=SANDBOX_IMAGE, argv=["python3", "-c", code], limits=Limits(cpus=0.5), timeout_s=60)


# stdout and stderr are separate pipes: their order is only kept when the writes are apart in time
# (0.05 s was not enough on a machine with a load of 10)
INTERLEAVED = """\
import sys, time
for i in range(6):
    print(f"out {i}", flush=True)
    time.sleep(0.15)
    print(f"err {i}", file=sys.stderr, flush=True)
    time.sleep(0.15)
sys.stderr.write("no newline at the end")
sys.stderr.flush()
"""


def test_on_output_gets_the_interleaved_output_as_it_arrives_without_the_report(sandbox):
    chunks: list[tuple[float, bytes]] = []
    result = sandbox.run(spec(INTERLEAVED), on_output=lambda b: chunks.append((time.monotonic(), b)))
    done = time.monotonic()
    streamed = b"".join(c for _, c in chunks).decode()
    assert result.exit_code == 0
    expected = "".join(f"out {i}\nerr {i}\n" for i in range(6)) + "no newline at the end"
    assert streamed == expected == result.log
    assert len(chunks) >= 6 and chunks[0][0] < done - 0.4  # pieces came while it ran, not at the end


def test_a_failing_on_output_never_breaks_the_run(sandbox):
    calls = 0

    def broken(_: bytes) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("reader fell over")

    result = sandbox.run(spec(INTERLEAVED), on_output=broken)
    assert result.exit_code == 0 and not result.timed_out
    assert result.log.endswith("no newline at the end") and calls >= 2
