"""The loop page and the progress chart: a real service runs a real loop (one slot, so the decisions
follow submission order), the chart is fetched over HTTP and parsed, and the page is opened in a
real headless Chromium (Debian's `chromium`, driven by Playwright over its pipe; no browser download).

`RATCHET_UPDATE_SCREENSHOT=1` copies the page's screenshot to docs/loop-page.png (the README's).
"""

from __future__ import annotations

import os
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Server, leftovers
from test_api import HARNESS, TRAIN

from service.http import pages
from service.models import LoopConfig
from service.state.enqueue import create_loop
from service.state.store import Store

CHROMIUM = os.environ.get("RATCHET_CHROMIUM", "/usr/bin/chromium")
# No network beyond 127.0.0.1, no background services, a fresh profile (the user-data-dir is given
# to Playwright, which passes it on).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SVG = "{http://www.w3.org/2000/svg}"
XSS = '<img src=x onerror="alert(1)"><script>alert("xss")</script> & friends'
# (description, value of V in train.py): realistic descriptions, one crash, one wild discard, and
# one candidate whose description tries to inject markup (kept, so the chart labels it too)
HISTORY = [
    ("raise the learning rate 1e-3 -> 3e-3", "0.9841"),
    ("remove weight decay", "0.9913"),
    ("cosine schedule, 200 warm-up steps", "0.9702"),
    ("fused attention (typo in the kernel call)", "1 / 0"),
    ("batch size 64 -> 128", "0.9755"),
    ("SwiGLU MLP instead of GELU", "0.9588"),
    ("learning rate 1.0", "97.5"),
    (XSS, "0.9500"),
    ("rotary position embeddings", "0.9467"),
    ("tie input and output embeddings", "0.9489"),
    ("6 layers instead of 4", "0.9391"),
    ("dropout 0.1", "0.9420"),
    ("label smoothing 0.05", "0.9335"),
    ("gradient clipping at 1.0", "0.9352"),
]
RUNNING = "longer training run (2x steps)"


def _browser_problem() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing: apt-get install chromium (scripts/setup.sh installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[test]'"
    return None


def _files(value: str, sleep: str = "0.0") -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")}


@pytest.fixture(scope="module")
def watched(docker_client, tmp_path_factory) -> Iterator[dict]:
    """A loop with a finished history and one experiment still running."""
    server = Server(tmp_path_factory.mktemp("web") / "srv", slots=1).start()
    try:
        body = {
            "name": "charlm-demo",
            "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
            "editable": ["train.py"],
            "time_budget_s": 60,
            "timeout_s": 170,
            "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        }
        r = server.client.post("/v1/loops", json=body)
        assert r.status_code == 201, r.text
        loop = r.json()
        lid = loop["id"]
        for description, value in HISTORY:
            r = server.client.post(
                f"/v1/loops/{lid}/experiments", json={"description": description, "files": _files(value)}
            )
            assert r.status_code == 202, r.text
        r = server.client.post(
            f"/v1/loops/{lid}/experiments", json={"description": RUNNING, "files": _files("0.93", "150")}
        )
        running = r.json()["id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if server.client.get(f"/v1/experiments/{running}").json()["status"] == "running":
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the last experiment never started:\n{server.log()[-3000:]}")
        time.sleep(2)  # so the page shows it running for a moment
        yield {"server": server, "loop_id": lid, "running": running}
    finally:
        server.stop()
        left = leftovers(docker_client, f"ratchet.sandbox={server.instance}")
        assert not left, f"left behind: {left}"


def _experiments(server: Server, lid: str) -> list[dict]:
    return server.client.get(f"/v1/loops/{lid}/experiments", params={"limit": 1000}).json()["items"]


def test_history_was_decided_as_expected(watched):
    """Guards the fixture: the page tests below rely on this mix of statuses."""
    items = _experiments(watched["server"], watched["loop_id"])
    statuses = [x["status"] for x in items]
    assert statuses.count("keep") == 8  # baseline + 7 improvements
    assert statuses.count("discard") == 6 and statuses.count("crash") == 1
    assert statuses[-1] == "running"


def test_progress_svg_over_http(watched):
    server, lid = watched["server"], watched["loop_id"]
    r = server.client.get(f"/v1/loops/{lid}/progress.svg")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert r.headers["cache-control"] == "no-store"
    assert "<script" not in r.text and "<img" not in r.text
    root = ET.fromstring(r.text)
    items = _experiments(server, lid)
    keeps = [x for x in items if x["status"] == "keep"]
    discards = [x for x in items if x["status"] == "discard"]
    circles = [c.get("class") for c in root.iter(f"{SVG}circle")]
    clipped = [p for p in root.iter(f"{SVG}path") if p.get("class") == "clipped"]
    assert circles.count("keep") == len(keeps)
    assert circles.count("discard") + len(clipped) == len(discards)
    assert len(clipped) == 1  # the 97.5 discard, drawn at the edge
    labels = ["".join(t.itertext()) for t in root.iter(f"{SVG}text") if t.get("class") == "label"]
    assert any(label.startswith('<img src=x onerror="alert(1)">') for label in labels)
    assert "val_bpb (lower is better)" in "".join(root.itertext())
    assert "charlm-demo" in "".join(root.itertext())


def test_pages_escape_and_stay_out_of_the_schema(watched):
    server, lid = watched["server"], watched["loop_id"]
    r = server.client.get(f"/loops/{lid}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(&quot;xss&quot;)&lt;/script&gt;" in r.text
    assert "<script>alert" not in r.text and '<img src=x onerror="alert(1)">' not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'nonce-" in csp and "unsafe-inline" not in csp
    assert server.client.get("/", follow_redirects=False).headers["location"] == "/loops"
    assert lid in server.client.get("/loops").text
    paths = server.client.get("/schema/openapi.json").json()["paths"]
    assert "/v1/loops/{loop_id}/progress.svg" in paths
    assert not [p for p in paths if p == "/" or p.startswith("/loops")]
    r = server.client.get("/loops/0123456789abcdef")
    assert r.status_code == 404 and "no loop 0123456789abcdef" in r.json()["detail"]
    assert server.client.get("/loops/not-an-id").status_code == 400
    assert server.client.get("/v1/loops/0123456789abcdef/progress.svg").status_code == 404


class Watch:
    """Everything a page reports that would mean it is broken."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda req: self.problems.append(f"failed: {req.url} {req.failure}"))
        page.on("response", self._response)
        page.on("dialog", self._dialog)

    def _console(self, msg) -> None:
        if msg.type in ("error", "assert"):
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def browser(tmp_path) -> Iterator:
    problem = _browser_problem()
    if problem:
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":  # CI: the real browser is required
            pytest.fail(f"headless Chromium required: {problem}")
        pytest.skip(f"needs headless Chromium: {problem}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
            device_scale_factor=1,
        )
        try:
            yield context
        finally:
            context.close()


def test_loop_page_in_chromium(watched, browser, tmp_path):
    server, lid, running = watched["server"], watched["loop_id"], watched["running"]
    items = {x["id"]: x for x in _experiments(server, lid)}
    page = browser.new_page()
    watch = Watch(page)
    page.goto(f"{server.url}/loops/{lid}", wait_until="load")

    assert page.title() == "charlm-demo · Ratchet"
    rows = page.locator("#experiments tbody tr")
    assert rows.count() == len(items)
    for exp_id, exp in items.items():
        assert page.locator(f"#x-{exp_id}").get_attribute("data-status") == exp["status"]

    # the chart loaded and is on screen
    page.wait_for_function("() => document.getElementById('chart').complete")
    width, height = page.evaluate(
        "() => { const img = document.getElementById('chart');"
        " return [img.naturalWidth, img.naturalHeight]; }"
    )
    assert width > 0 and height > 0
    box = page.locator("#chart").bounding_box()
    assert box and box["width"] > 400 and box["height"] > 200 and page.locator("#chart").is_visible()

    # hostile text is text: shown verbatim, nothing injected, nothing executed
    xss_id = next(i for i, x in items.items() if x["description"] == XSS)
    assert page.locator(f"#x-{xss_id} td.desc").text_content() == XSS
    assert page.locator("#experiments img, #experiments script").count() == 0

    # links to logs, diffs and archives work
    keep = next(x for x in items.values() if x["status"] == "keep" and x["kind"] == "candidate")
    hrefs = page.locator(f"#x-{keep['id']} td.links a").evaluate_all("els => els.map(a => a.href)")
    assert [h.rsplit("/", 1)[-1] for h in hrefs] == ["logs", "diff", "archive"]
    for href in hrefs:
        assert browser.request.get(href).status == 200, href
    assert "+V = " in browser.request.get(hrefs[1]).text()

    shot = tmp_path / "loop-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("RATCHET_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "loop-page.png")

    # it refreshes itself: a change on the server shows up without a navigation
    page.evaluate("() => { window.sameDocument = true; }")
    assert server.client.post(f"/v1/experiments/{running}/cancel").status_code == 200
    page.wait_for_selector(f'#x-{running}[data-status="cancelled"]', timeout=20_000)
    assert page.evaluate("() => window.sameDocument === true")
    # a finished experiment more: the chart is fetched again too
    page.wait_for_function("() => document.getElementById('chart').src.includes('?t=')", timeout=20_000)

    # the chart itself, opened as a document, has its dots
    svg = browser.new_page()
    svg_watch = Watch(svg)
    svg.goto(f"{server.url}/v1/loops/{lid}/progress.svg")
    assert svg.locator("circle.keep").count() == sum(x["status"] == "keep" for x in items.values())

    # the index lists the loop and links to its page
    index = browser.new_page()
    index_watch = Watch(index)
    index.goto(f"{server.url}/")
    index.click("text=charlm-demo")
    index.wait_for_url(f"**/loops/{lid}")

    problems = watch.problems + svg_watch.problems + index_watch.problems
    assert not problems, problems
    assert not watch.dialogs + index_watch.dialogs


async def test_chart_of_a_huge_loop_is_bounded(tmp_path):
    """100k experiments: one pass over the database, keeps all drawn, discards sampled; the page
    lists only the newest."""
    store = Store(tmp_path / "ratchet.db")
    await store.open()
    try:
        root = "0" * 64
        lid, base = await create_loop(store, LoopConfig(name="huge"), root, b"[]")
        rows = []
        best = 2.0
        for n in range(2, 100_001):
            value = best + 0.01 + (n % 97) / 1000
            status = "discard"
            if n % 5000 == 0:
                best, value, status = best - 0.01, best - 0.01, "keep"
            elif n % 11 == 0:
                status, value = "crash", None
            rows.append((f"{n:016x}", lid, n, "candidate", f"try {n}", root, status, value))
        async with store.tx() as db:
            await db.execute("UPDATE experiments SET status = 'keep', metric = 2.0 WHERE id = ?", (base,))
            await db.executemany(
                "INSERT INTO experiments (id, loop_id, seq, kind, description, snapshot, status, metric,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                rows,
            )
        loop = await store.get_loop(lid)
        t0 = time.monotonic()
        svg = await pages.progress_chart(store, loop)
        took = time.monotonic() - t0
        latest = await store.latest_experiments(lid, pages.LEDGER_ROWS)
    finally:
        await store.close()
    root_el = ET.fromstring(svg)
    classes = [el.get("class") for el in root_el.iter() if el.tag in (f"{SVG}circle", f"{SVG}path")]
    discards = loop.counts["discard"]
    drawn = classes.count("discard") + classes.count("clipped")
    assert classes.count("keep") == loop.counts["keep"] == 21
    assert pages.MAX_DISCARD_DOTS / 2 <= drawn <= pages.MAX_DISCARD_DOTS
    assert f"{discards - drawn} of {discards} discards not drawn" in svg
    assert len(svg) < 2_000_000
    assert took < 20, f"chart of 100k experiments took {took:.1f} s"
    # the page's ledger shows the newest 200 and points to the rest
    assert [x.number for x in latest] == list(range(100_000, 99_800, -1))
    assert "the latest 200 of 100000" in pages._ledger(loop, latest, time.time())
