"""Webhooks end to end: a real service posts to a real receiver on 127.0.0.1 (tests/webhook_receiver.py)
while a real loop runs; deliveries are signed (and a wrong secret is detected), retried with
back-off after 500s, persisted across a kill -9, visible over the API and on the loop page, and
never show a secret. The event rules, the signature and the destination policy are checked as pure
functions too."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time

import pytest
from conftest import ROOT
from test_api import HARNESS, TRAIN
from webhook_receiver import Receiver

from service.ops_models import WebhookEvent
from service.rules.webhooks import (
    Allow,
    LedgerResult,
    address_problem,
    backoff_s,
    host_problem,
    ledger_events,
    parse_allow,
    sign,
    slack_escape,
    target_of,
    verify,
)

SECRET = "loop-secret-" + "s" * 20
SERVICE_SECRET = "service-secret-" + "x" * 20


def _files(value: str) -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}")}


def _row(n: int, status: str) -> LedgerResult:
    return LedgerResult(n, f"e{n}", n, "candidate", status, 1.0, f"try {n}", None, "a" * 64)


# -- pure rules --------------------------------------------------------------------------------------


def test_streaks_are_told_once_when_they_reach_n():
    statuses = ["keep", "crash", "timeout", "crash", "crash", "discard", "timeout", "timeout", "timeout"]
    rows = [_row(n, s) for n, s in enumerate(statuses, 1)]
    every = list(WebhookEvent)
    events = [(e.event.value, e.result.finish_seq) for e in ledger_events(rows, 0, 3, every)]
    assert events == [
        ("keep", 1),
        ("crash_streak", 4),  # crash, timeout, crash: timeouts count as crashes, as in the ledger
        ("crash_streak", 9),
        ("timeout_streak", 9),
    ]
    # rows up to `seen` only give context: a streak that began before it still counts
    later = [(e.event.value, e.result.finish_seq) for e in ledger_events(rows, 7, 3, every)]
    assert later == [("crash_streak", 9), ("timeout_streak", 9)]
    assert ledger_events(rows, 0, 3, [WebhookEvent.keep])[0].dedupe == "keep:e1"


def test_signature_verifies_and_a_wrong_one_is_detected():
    body = b'{"id":"d1","event":"keep"}'
    now = 1_800_000_000
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=") and len(header.rpartition("v1=")[2]) == 64
    assert verify(SECRET, header, body, now + 10)
    assert not verify("another-secret-xxxxxxxx", header, body, now)  # wrong secret
    assert not verify(SECRET, header, body + b" ", now)  # body changed
    assert not verify(SECRET, header, body, now + 3600)  # replayed an hour later
    assert not verify(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body, now)  # time changed
    assert not verify(SECRET, "v1=abc", body, now)


def test_the_readme_verification_snippet_works():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```python")[1:]
    block = next(b for b in blocks if b.lstrip().startswith("# verify a Ratchet webhook"))
    namespace: dict = {}
    exec(block.split("```")[0], namespace)  # our own README's code
    body = b'{"id":"d1","event":"keep","text":"hi"}'
    header = sign(SECRET, int(time.time()), body)
    assert namespace["verify"](SECRET, header, body)
    assert not namespace["verify"]("wrong-secret-xxxxxxxxxxxx", header, body)
    assert not namespace["verify"](SECRET, header, body + b"x")


def test_destination_policy():
    allow = parse_allow("10.1.0.0/16,hooks.internal,127.0.0.1")
    ip = ipaddress.ip_address
    assert address_problem("hooks.slack.com", ip("34.1.2.3"), Allow()) is None
    for metadata in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254"):
        problem = address_problem("x", ip(metadata), allow)
        assert problem and "never" in problem, metadata
    assert "RATCHET_WEBHOOK_ALLOW" in address_problem("x", ip("10.2.0.1"), allow)
    assert "RATCHET_WEBHOOK_ALLOW" in address_problem("x", ip("192.168.1.1"), Allow())
    assert "RATCHET_WEBHOOK_ALLOW" in address_problem("x", ip("127.0.0.2"), allow)
    assert address_problem("x", ip("10.1.200.3"), allow) is None
    assert address_problem("hooks.internal", ip("192.168.1.1"), allow) is None
    assert address_problem("y", ip("127.0.0.1"), allow) is None
    assert address_problem("y", ip("::ffff:127.0.0.1"), allow) is None
    strict = parse_allow("hooks.internal,203.0.113.0/24", public=False)  # only the allow-list
    assert "RATCHET_WEBHOOK_ALLOW_PUBLIC" in address_problem("a.example", ip("34.1.2.3"), strict)
    assert address_problem("b.example", ip("203.0.113.9"), strict) is None
    assert "RATCHET_WEBHOOK_ALLOW_PUBLIC" in host_problem("a.example", strict)  # refused before resolving
    assert host_problem("hooks.internal", strict) is None and host_problem("a.example", allow) is None
    assert target_of("https://hooks.slack.com/services/T0/B0/secretpart?x=1") == "https://hooks.slack.com"
    assert target_of("http://[::1]:8080/x") == "http://[::1]:8080"
    assert slack_escape("<!channel> & <http://x|y>") == "&lt;!channel&gt; &amp; &lt;http://x|y&gt;"
    assert [backoff_s(n, 10) for n in (1, 2, 3)] == [10, 20, 40]
    assert backoff_s(20, 10) == 3600 and backoff_s(1, 10, retry_after_s=120) == 120


# -- a real service, a real receiver ------------------------------------------------------------------


def _loop_body(name: str, webhooks: list[dict], **extra) -> dict:
    return {
        "name": name,
        "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
        "time_budget_s": 5,
        "timeout_s": 20,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        "webhooks": webhooks,
        **extra,
    }


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def _env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "RATCHET_WEBHOOK_ALLOW": "127.0.0.1",
        "RATCHET_WEBHOOK_BACKOFF_S": "0.3",
        "RATCHET_WEBHOOK_TIMEOUT_S": "5",
        **extra,
    }


def test_signed_retried_deliveries_of_a_loops_events(server_factory, receiver):
    srv = server_factory(
        slots=1,
        env=_env(
            receiver,
            RATCHET_WEBHOOK_URL=f"{receiver.url}/fail-2",  # service-wide: two 500s, then accepted
            RATCHET_WEBHOOK_SECRET=SERVICE_SECRET,
            RATCHET_WEBHOOK_EVENTS="keep,loop_paused",
        ),
    )
    hooks = [
        {"url": f"{receiver.url}/ok", "secret": SECRET, "streak": 2},
        {"url": f"{receiver.url}/gone", "secret": SECRET, "events": ["keep"]},  # refuses: 404
    ]
    r = srv.client.post("/v1/loops", json=_loop_body("hooked", hooks))
    assert r.status_code == 201, r.text
    loop = r.json()
    lid = loop["id"]
    assert "webhooks" not in loop and SECRET not in r.text

    # the baseline is kept: a signed keep to the loop's hook
    keep = receiver.wait("/ok", lambda x: x.json["event"] == "keep")
    assert keep.headers["content-type"] == "application/json"
    assert keep.headers["x-ratchet-event"] == "keep"
    assert keep.headers["x-ratchet-delivery"] == keep.json["id"]
    assert verify(SECRET, keep.headers["x-ratchet-signature"], keep.body, time.time())
    assert not verify(SERVICE_SECRET, keep.headers["x-ratchet-signature"], keep.body, time.time())
    assert keep.json["loop"]["id"] == lid and keep.json["experiment"]["kind"] == "baseline"
    assert keep.json["text"].startswith("Ratchet · hooked: baseline val_bpb 1.000000")

    # the service-wide hook got it after two 500s, signed with its own secret, backing off
    flaky = receiver.wait("/fail-2", lambda x: x.json["event"] == "keep")
    tries = [x for x in receiver.got("/fail-2", None) if x.json["id"] == flaky.json["id"]]
    assert [x.status for x in tries] == [500, 500, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55, gaps  # 0.3 s, then 0.6 s
    assert verify(SERVICE_SECRET, flaky.headers["x-ratchet-signature"], flaky.body, time.time())
    assert len({x.headers["x-ratchet-signature"] for x in tries}) == 3  # each attempt signed afresh

    # a new best with hostile text, then two crashes in a row
    desc = "<!channel> wins & <https://evil|click>"
    srv.client.post(f"/v1/loops/{lid}/experiments", json={"description": desc, "files": _files("0.5")})
    best = receiver.wait(
        "/ok", lambda x: x.json["event"] == "keep" and x.json["experiment"]["kind"] == "candidate"
    )
    assert best.json["experiment"]["description"] == desc  # the field keeps the bytes...
    assert (
        "<!channel>" not in best.json["text"] and "&lt;!channel&gt;" in best.json["text"]
    )  # ...text is safe
    assert "new best val_bpb 0.500000" in best.json["text"]
    for n in range(2):  # distinct snapshots: a repeat would be answered as a duplicate, not run
        srv.client.post(
            f"/v1/loops/{lid}/experiments", json={"description": f"bad {n}", "files": _files(f"{n} / 0")}
        )
    streak = receiver.wait("/ok", lambda x: x.json["event"] == "crash_streak")
    assert streak.json["streak"] == 2 and streak.json["experiment"]["status"] == "crash"
    assert "2 results in a row crashed" in streak.json["text"]

    # pause and stop
    assert srv.client.post(f"/v1/loops/{lid}/pause").status_code == 200
    receiver.wait("/ok", lambda x: x.json["event"] == "loop_paused")
    receiver.wait("/fail-2", lambda x: x.json["event"] == "loop_paused")
    assert srv.client.post(f"/v1/loops/{lid}/stop").status_code == 200
    finished = receiver.wait("/ok", lambda x: x.json["event"] == "loop_finished")
    assert "stopped" in finished.json["text"]
    assert not [
        x for x in receiver.got("/fail-2", None) if x.json["event"] == "loop_finished"
    ]  # not its event

    # delivery state over the API: nothing secret, the refused one failed for good at once
    listed = srv.client.get("/v1/webhooks", params={"loop_id": lid})
    assert listed.status_code == 200 and SECRET not in listed.text and SERVICE_SECRET not in listed.text
    views = {h["target"] + "|" + str(h["loop_id"]): h for h in listed.json()}
    assert set(views) == {f"{receiver.url}|{lid}", f"{receiver.url}|None"}
    assert all("/ok" not in h["target"] for h in listed.json())  # no paths: they may hold tokens
    gone = [h for h in listed.json() if h["failed"]]
    assert len(gone) == 1 and gone[0]["last_error"] == "HTTP 404"
    deliveries = srv.client.get("/v1/webhooks/deliveries", params={"loop_id": lid, "state": "failed"}).json()
    assert [d["attempts"] for d in deliveries["items"]] == [1, 1]  # baseline keep and candidate keep
    service_ones = srv.client.get("/v1/webhooks/deliveries", params={"webhook_id": "service"}).json()["items"]
    assert {d["state"] for d in service_ones} == {"delivered"} and max(
        d["attempts"] for d in service_ones
    ) == 3

    # the page shows the failures
    page = srv.client.get(f"/loops/{lid}").text
    assert 'id="webhooks"' in page and "2 failed" in page and "HTTP 404" in page
    # a failed one can be tried again (it fails again: the receiver still says 404)
    failed_id = deliveries["items"][0]["id"]
    again = srv.client.post(f"/v1/webhooks/deliveries/{failed_id}/retry")
    assert again.status_code == 200 and again.json()["state"] == "pending"
    assert srv.client.delete("/v1/webhooks/service").status_code == 409


def test_deliveries_survive_a_kill(server_factory, receiver, tmp_path):
    srv = server_factory(slots=1, env=_env(receiver), name="hooks")
    r = srv.client.post(
        "/v1/loops", json=_loop_body("held", [{"url": f"{receiver.url}/hold", "secret": SECRET}])
    )
    lid = r.json()["id"]
    first = receiver.wait("/hold", lambda x: x.json["event"] == "keep", status=500)
    srv.stop(kill=True)  # kill -9 while the delivery waits for its next attempt
    receiver.release()
    again = server_factory(slots=1, env=_env(receiver), name="hooks")  # same data dir
    delivered = receiver.wait("/hold", lambda x: x.json["id"] == first.json["id"], timeout=60)
    assert delivered.body == first.body and verify(
        SECRET, delivered.headers["x-ratchet-signature"], delivered.body, time.time()
    )
    # the receiver has answered; the service records that right after, so give it a moment
    deadline = time.monotonic() + 15
    while True:
        state = again.client.get("/v1/webhooks/deliveries", params={"loop_id": lid}).json()["items"]
        keeps = [d["state"] for d in state if d["event"] == "keep"]
        if keeps == ["delivered"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert keeps == ["delivered"], state


def test_webhook_destinations_are_checked(server, receiver):
    """No allow-list: loopback, private and metadata addresses are refused; a name that resolves to
    loopback is refused when the delivery connects."""
    for url, words in (
        ("http://169.254.169.254/latest/meta-data", "never"),
        ("http://10.0.0.7/hook", "RATCHET_WEBHOOK_ALLOW"),
        ("http://[::1]:9/x", "RATCHET_WEBHOOK_ALLOW"),
        ("ftp://example.com/x", "http"),
        ("http://user:pw@example.com/x", "user name"),
    ):
        r = server.client.post("/v1/loops", json=_loop_body("refused", [{"url": url}]))
        assert r.status_code in (400, 422) and words in r.text, (url, r.text)
    assert server.client.get("/v1/loops").json() == []  # nothing was stored
    port = receiver.url.rsplit(":", 1)[1]
    r = server.client.post("/v1/loops", json=_loop_body("named", [{"url": f"http://localhost:{port}/ok"}]))
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = server.client.get("/v1/webhooks/deliveries", params={"loop_id": lid}).json()["items"]
        if items and items[0]["state"] == "failed":
            break
        time.sleep(0.2)
    assert items[0]["state"] == "failed" and "refused" in items[0]["last_error"], items
    assert items[0]["attempts"] == 1 and not receiver.requests


async def test_proposer_failure_hook_point(tmp_path, receiver):
    """`webhooks.proposer_failed` is what a proposer calls: the delivery is written at once and sent."""
    from service.models import LoopConfig
    from service.ops_models import WebhookSpec
    from service.runs.webhook_sender import WebhookSender
    from service.settings import Settings
    from service.state import webhooks
    from service.state.enqueue import create_loop
    from service.state.store import Store

    store = Store(tmp_path / "ratchet.db")
    await store.open()
    settings = Settings(webhook_allow="127.0.0.1", webhook_backoff_s=0.1)
    sender = WebhookSender(settings, store)
    try:
        lid, _ = await create_loop(store, LoopConfig(name="p"), "0" * 64, b'{"files":[]}')
        spec = WebhookSpec(url=f"{receiver.url}/ok", secret=SECRET, events=[WebhookEvent.proposer_failed])
        await webhooks.add_webhooks(store, lid, [spec])
        await webhooks.proposer_failed(store, lid, "the proposer exited 1: out of ideas")
        await sender.start()
        got = await asyncio.to_thread(receiver.wait, "/ok", None, 20)
    finally:
        await sender.stop()
        await store.close()
    assert got.json["event"] == "proposer_failed" and "out of ideas" in got.json["text"]
    assert verify(SECRET, got.headers["x-ratchet-signature"], got.body, time.time())
