"""What a browser looks at: the progress chart (`/v1/loops/{id}/progress.svg`) and small read-only
HTML pages (`/loops`, `/loops/{id}`) rendered on the server from plain template strings, so there is
no front-end build step. Every piece of user text goes through `html.escape`: descriptions are
written by agents and treated as hostile. A per-response CSP nonce lets only our own inline script run.
"""

from __future__ import annotations

import asyncio
import html
import math
import secrets
import time
from collections.abc import Iterable

from litestar import Controller, Response, get
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.response import Redirect

from ..models import ExperimentView, LoopView, Status
from ..rules.chart import Point, progress_svg
from ..state.proposal_reads import list_proposals
from ..state.store import Store
from .common import LoopId, errors, loop_or_404
from .login import login_required_page
from .proposal_pages import PROPOSALS_SHOWN, proposer_section
from .services import Services
from .webhooks import webhook_notice

__all__ = ["LEDGER_ROWS", "MAX_DISCARD_DOTS", "PageController", "ProgressController", "progress_chart"]

# A loop can have 100k experiments; beyond this many discards the chart draws an even sample.
# Keeps are always drawn: each one had to beat every earlier keep, so they stay few.
MAX_DISCARD_DOTS = 4000
LEDGER_ROWS = 200
REFRESH_S = 5


async def progress_chart(store: Store, loop: LoopView, max_discards: int = MAX_DISCARD_DOTS) -> str:
    """The loop's progress chart, read from the database in one pass in experiment order."""
    stride = max(1, math.ceil(loop.counts.get(Status.discard, 0) / max_discards))
    points: list[Point] = []
    discards = 0
    async for r in store.progress_rows(loop.id):
        if r.status == Status.keep:
            points.append(Point(r.number, r.metric, True, r.description or ""))
        else:
            if discards % stride == 0:
                points.append(Point(r.number, r.metric, False))
            discards += 1
    drawn = sum(1 for p in points if not p.kept)
    metric = loop.config.metric
    return await asyncio.to_thread(
        progress_svg, points, metric.name, metric.direction, loop.name, not_drawn=discards - drawn
    )


class ProgressController(Controller):
    path = "/v1/loops"
    tags = ["loops"]

    @get(
        "/{loop_id:str}/progress.svg",
        operation_id="getProgressChart",
        media_type="image/svg+xml",
        summary="The progress chart: metric per experiment, kept ones labelled, the running best",
        responses=errors(404),
    )
    async def progress(self, loop_id: LoopId, services: Services) -> Response[str]:
        loop = await loop_or_404(services, loop_id, where=" or open /loops")
        svg = await progress_chart(services.store, loop)
        return Response(
            svg,
            media_type="image/svg+xml",
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            },
        )


class PageController(Controller):
    path = "/"
    include_in_schema = False
    # without a session (or a bearer token) a page answers 401 with a link to /login, as HTML
    exception_handlers = {
        NotAuthorizedException: login_required_page,
        PermissionDeniedException: login_required_page,
    }

    @get("/")
    async def root(self) -> Redirect:
        return Redirect("/loops")

    # `?live=true` answers only the parts that change, for the page's own refresh
    @get("/loops")
    async def index(self, services: Services, live: bool = False) -> Response[str]:
        table = _loops_table(await services.store.list_loops())
        if live:
            return _html(table)
        nonce = _nonce()
        return _html(_doc("Ratchet loops", "<h1>Ratchet loops</h1>", table, nonce), nonce)

    @get("/loops/{loop_id:str}")
    async def loop_page(self, loop_id: LoopId, services: Services, live: bool = False) -> Response[str]:
        loop = await loop_or_404(services, loop_id, where=" or open /loops")
        experiments = await services.store.latest_experiments(loop_id, LEDGER_ROWS)
        best = None
        if loop.best_experiment:
            best = await services.store.get_experiment(loop.best_experiment, with_tail=False)
        summary, ledger = _summary(loop, best), _ledger(loop, experiments, time.time())
        if loop.proposer is not None:
            total = sum(loop.proposer.counts.values())
            runs = await list_proposals(
                services.store, loop_id, None, max(0, total - PROPOSALS_SHOWN), PROPOSALS_SHOWN
            )
            ledger = proposer_section(loop, list(reversed(runs))) + ledger
        summary += await webhook_notice(services, loop_id)
        if live:
            return _html(summary + ledger)
        nonce = _nonce()
        return _html(_loop_page(loop, summary, ledger, nonce), nonce)


def _nonce() -> str:
    return secrets.token_urlsafe(16)


def _html(body: str, nonce: str | None = None) -> Response[str]:
    """An HTML response whose CSP lets only the inline style and script carrying `nonce` run."""
    allow = f"'nonce-{nonce}'" if nonce else "'none'"
    csp = (
        f"default-src 'none'; script-src {allow}; style-src {allow}; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


# -- rendering ----------------------------------------------------------------------------------

e = html.escape

CSS = """
:root { --fg:#202124; --muted:#5f6368; --line:#e0e3e7; --bg:#fafafa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 12px; padding: 14px 24px; background: #fff;
  border-bottom: 1px solid var(--line); }
header h1 { margin: 0; font-size: 20px; }
header .crumb { color: var(--muted); text-decoration: none; }
main { padding: 16px 24px 32px; max-width: 1280px; }
h2 { font-size: 15px; margin: 22px 0 8px; }
a { color: #1a73e8; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 17px; font-weight: 600; overflow-wrap: anywhere; }
.card .s { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.counts { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 10px; }
.chart { background: #fff; border: 1px solid var(--line); border-radius: 8px; margin-top: 14px;
  padding: 6px; }
.chart img { display: block; width: 100%; max-width: 960px; height: auto; margin: 0 auto; }
dl.config { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0;
  background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
dl.config dt { color: var(--muted); }
dl.config dd { margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px;
  overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; background: #f5f6f7; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
td.desc { max-width: 420px; overflow-wrap: anywhere; }
td.reason { max-width: 300px; color: var(--muted); font-size: 12.5px; overflow-wrap: anywhere; }
td.links a { margin-right: 6px; white-space: nowrap; }
tr.best td { background: #eef8f1; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  color: #fff; background: #9aa0a6; white-space: nowrap; }
.b-keep, .b-ok, .b-active { background: #1a9850; } .b-discard { background: #9aa0a6; }
.b-crash, .b-failed { background: #c0392b; } .b-timeout { background: #e67e22; }
.b-cancelled, .b-stopped { background: #6c7a89; } .b-error { background: #8e44ad; }
.b-queued, .b-pending { background: #7986cb; } .b-running { background: #1e88e5; }
.b-paused { background: #f1a208; } .b-confirming { background: #26a69a; } .b-measured { background: #78909c; }
.b-proposed { background: #1a9850; } .b-duplicate { background: #f1a208; }
.muted { color: var(--muted); }
.notice { margin-top: 10px; padding: 8px 12px; border: 1px solid #f0b7b1; background: #fdf1f0;
  border-radius: 8px; overflow-wrap: anywhere; }
footer { padding: 0 24px 24px; color: var(--muted); font-size: 12px; }
"""

# Re-renders by fetching the parts of this page that change (`?live=true`) and swapping them in as
# the server rendered and escaped them, so escaping lives in one place. The fragment carries no style
# or script, so nothing in it needs (or could use) the nonce. The chart is swapped once its new
# version has loaded, so it never flickers.
SCRIPT = """
(() => {
  const chart = document.getElementById("chart");
  const stamp = document.getElementById("updated");
  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(location.pathname + "?live=true", {cache: "no-store"});
      if (!response.ok) { stamp.textContent = "refresh failed: HTTP " + response.status; return; }
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const finished = () => document.getElementById("summary")?.dataset.finished;
      const before = finished();
      for (const part of document.querySelectorAll("[data-live]")) {
        const fresh = doc.getElementById(part.id);
        if (fresh) part.replaceWith(document.importNode(fresh, true));
      }
      if (chart && finished() !== before) {
        const next = new Image();
        next.onload = () => { chart.src = next.src; };
        next.src = chart.dataset.src + "?t=" + Date.now();
      }
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      stamp.textContent = "server unreachable, retrying";
    }
  }
  setInterval(refresh, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_S * 1000))


def _doc(title: str, header: str, body: str, nonce: str) -> str:
    js = f'<script nonce="{nonce}">{SCRIPT}</script>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{e(title)}</title><style nonce="{nonce}">{CSS}</style>'
        f"</head><body><header>{header}</header><main>{body}</main>"
        f'<footer><span id="updated">rendered {time.strftime("%H:%M:%S")}</span>'
        f" · refreshes every {REFRESH_S} s</footer>{js}</body></html>"
    )


def _badge(value: str) -> str:
    return f'<span class="badge b-{e(value)}">{e(value)}</span>'


def _metric(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _card(key: str, value: str, sub: str = "") -> str:
    s = f'<div class="s">{sub}</div>' if sub else ""
    return f'<div class="card"><div class="k">{e(key)}</div><div class="v">{value}</div>{s}</div>'


def _summary(loop: LoopView, best: ExperimentView | None) -> str:
    m = loop.config.metric
    direction = "lower is better" if m.direction == "minimize" else "higher is better"
    total = sum(loop.counts.values())
    finished = total - loop.counts.get(Status.queued, 0) - loop.counts.get(Status.running, 0)
    baseline_sub = e(loop.baseline_reason) if loop.baseline_reason else ""
    state_sub = e(loop.state_reason) if loop.state_reason else ""
    if loop.best_snapshot:
        snap = e(loop.best_snapshot)
        best_sub = f'snapshot <a href="/v1/snapshots/{snap}/archive">{snap[:12]}</a>'
        if best is not None:
            best_sub += f" · #{best.number} {e(_short(best.description, 60))}"
    else:
        best_sub = "no baseline yet"
    cards = [
        _card("state", _badge(str(loop.state)), state_sub),
        _card("baseline", _badge(str(loop.baseline)), baseline_sub),
        _card(f"best {m.name}", e(_metric(loop.best_metric)) or "—", best_sub),
        _card("experiments", str(total), f"{loop.counts.get('keep', 0)} kept · {direction}"),
    ]
    counts = "".join(
        f"{_badge(s.value)} <span>{loop.counts.get(s.value, 0)}</span> &nbsp;"
        for s in Status
        if loop.counts.get(s.value, 0)
    )
    return (
        f'<section id="summary" data-live data-finished="{finished}">'
        f'<div class="cards">{"".join(cards)}</div>'
        f'<div class="counts">{counts}</div></section>'
    )


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _config(loop: LoopView) -> str:
    c = loop.config
    r = c.resources
    rows: list[tuple[str, str]] = [
        ("metric", f"{c.metric.name} ({c.metric.direction}, min_delta {c.metric.min_delta:g})"),
        ("time budget", f"{c.time_budget_s:g} s (hard kill at {c.hard_timeout_s:g} s)"),
        (
            "resources",
            f"{r.cpus:g} CPUs, {r.memory_mb} MB, {r.gpus} GPUs, {r.pids} pids, {r.disk_mb} MB disk",
        ),
        ("editable", ", ".join(c.editable)),
        ("command", " ".join(c.command)),
        ("image", c.image or "(service default)"),
        ("runtime", c.runtime or "(service default)"),
        ("max experiments", str(c.max_experiments) if c.max_experiments else "unlimited"),
        ("datasets", ", ".join(f"{d.name} at {d.target}" for d in c.datasets) or "none"),
        ("cache", _cache(loop)),
        ("created", _when(loop.created_at)),
        ("loop id", loop.id),
    ]
    items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in rows)
    lid = e(loop.id)
    links = (
        f'<a href="/v1/loops/{lid}/results.tsv">results.tsv</a> · <a href="/v1/loops/{lid}">JSON</a> · '
        f'<a href="/v1/loops/{lid}/experiments">experiments</a> · '
        f'<a href="/v1/loops/{lid}/snapshots">snapshots</a> · '
        f'<a href="/v1/loops/{lid}/progress.svg">chart</a>'
    )
    return f'<h2>Configuration</h2><dl class="config">{items}</dl><p class="muted">{links}</p>'


def _cache(loop: LoopView) -> str:
    c = loop.cache
    if c is None:
        return "none yet (the first successful baseline run fills it)"
    size = f"{c.bytes / 1e6:.1f} MB in {c.files} files"
    if c.state == "too_large":
        return f"not kept: {size}, over RATCHET_CACHE_MAX_MB"
    return f"{size}, filled {_when(c.filled_at)} by {c.experiment}"


def _duration(x: ExperimentView, loop: LoopView, now: float) -> str:
    if x.status == Status.running and x.started_at:
        return f"{now - x.started_at:.0f} s of {loop.config.time_budget_s:g} s"
    if x.started_at and x.finished_at:
        return f"{x.finished_at - x.started_at:.1f} s"
    return ""


def _links(x: ExperimentView) -> str:
    xid = e(x.id)
    out = [f'<a href="/v1/experiments/{xid}/logs">log</a>']
    if x.kind == "candidate":
        out.append(f'<a href="/v1/experiments/{xid}/diff">diff</a>')
    if x.status == Status.keep:
        out.append(f'<a href="/v1/snapshots/{e(x.snapshot)}/archive">archive</a>')
    return "".join(out)


def _row(x: ExperimentView, loop: LoopView, now: float) -> str:
    cls = ' class="best"' if x.id == loop.best_experiment else ""
    mem = "" if x.memory_gb is None else f"{x.memory_gb:.{2 if x.memory_gb < 10 else 1}f}"
    return (
        f'<tr id="x-{e(x.id)}" data-status="{e(x.status.value)}"{cls}>'
        f'<td class="num">{x.number}</td><td>{_badge(x.status.value)}</td>'
        f'<td class="num">{_metric(x.metric)}</td><td class="num">{mem}</td>'
        f'<td class="num">{_duration(x, loop, now)}</td><td class="node">{e(x.node or "")}</td>'
        f'<td class="desc">{e(x.description)}</td><td class="reason">{e(x.reason or "")}</td>'
        f'<td class="links">{_links(x)}</td><td class="num muted">{e(x.commit)}</td></tr>'
    )


def _ledger(loop: LoopView, experiments: Iterable[ExperimentView], now: float) -> str:
    rows = [_row(x, loop, now) for x in experiments]
    total = sum(loop.counts.values())
    shown = (
        f"the latest {len(rows)} of {total}; all of them in "
        f'<a href="/v1/loops/{e(loop.id)}/results.tsv">results.tsv</a>'
        if total > len(rows)
        else f"all {total}"
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "status",
            e(loop.config.metric.name),
            "memory GB",
            "time",
            "node",
            "description",
            "reason",
            "",
            "commit",
        )
    )
    body = "".join(rows) or '<tr><td colspan="10" class="muted">no experiments yet</td></tr>'
    return (
        '<section id="ledger" data-live>'
        f'<h2>Experiments <span class="muted">({shown}, newest first)</span></h2>'
        f'<table id="experiments"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>'
    )


def _loop_page(loop: LoopView, summary: str, ledger: str, nonce: str) -> str:
    src = f"/v1/loops/{e(loop.id)}/progress.svg"
    header = (
        f'<a class="crumb" href="/loops">Ratchet loops</a><span class="muted">/</span><h1>{e(loop.name)}</h1>'
    )
    chart = (
        f'<div class="chart"><img id="chart" src="{src}" data-src="{src}" width="960" height="500"'
        f' alt="progress chart of {e(loop.name)}"></div>'
    )
    return _doc(f"{loop.name} · Ratchet", header, summary + chart + ledger + _config(loop), nonce)


def _index_row(loop: LoopView) -> str:
    lid = e(loop.id)
    cells = [
        f'<a href="/loops/{lid}">{e(loop.name)}</a>',
        _badge(str(loop.state)),
        _badge(str(loop.baseline)),
        _metric(loop.best_metric),
        e(loop.config.metric.name),
        str(sum(loop.counts.values())),
        *(str(loop.counts.get(s, 0)) for s in (Status.keep, Status.running, Status.queued)),
        e(_when(loop.created_at)),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _loops_table(loops: list[LoopView]) -> str:
    columns = (
        "loop",
        "state",
        "baseline",
        "best",
        "metric",
        "experiments",
        "kept",
        "running",
        "queued",
        "created",
    )
    head = "".join(f"<th>{h}</th>" for h in columns)
    body = "".join(_index_row(loop) for loop in reversed(loops)) or (
        '<tr><td colspan="10" class="muted">no loops yet: create one with POST /v1/loops</td></tr>'
    )
    return (
        f'<section id="loops" data-live><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )
