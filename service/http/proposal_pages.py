"""The proposer's part of the loop page: what it is doing (or why it idles), and its latest runs with
what each one made or why it failed. Every piece of text is escaped: descriptions, reasons and logs
come from proposers, which are as untrusted as candidates."""

from __future__ import annotations

import html
import time

from ..models import LoopView
from ..proposal_models import ProposalStatus, ProposalView

__all__ = ["PROPOSALS_SHOWN", "proposer_section"]

PROPOSALS_SHOWN = 20
e = html.escape


def _badge(value: str) -> str:
    return f'<span class="badge b-{e(value)}">{e(value)}</span>'


def _made(p: ProposalView) -> str:
    if p.experiment_id:
        return f'<a href="/v1/experiments/{e(p.experiment_id)}">{e(p.experiment_id)}</a>'
    if p.duplicate_of:
        return f'= <a href="/v1/experiments/{e(p.duplicate_of)}">{e(p.duplicate_of)}</a>'
    return ""


def _took(p: ProposalView, now: float) -> str:
    if p.started_at is None:
        return ""
    end = p.finished_at if p.finished_at is not None else now
    return f"{max(0.0, end - p.started_at):.1f} s"


def _row(p: ProposalView, now: float) -> str:
    pid = e(p.id)
    return (
        f'<tr id="p-{pid}" data-status="{e(p.status.value)}"><td class="num">{p.number}</td>'
        f'<td>{_badge(p.status.value)}</td><td class="num">{_took(p, now)}</td>'
        f'<td class="desc">{e(p.description or "")}</td><td class="reason">{e(p.reason or "")}</td>'
        f'<td class="links">{_made(p)}</td>'
        f'<td class="links"><a href="/v1/proposals/{pid}/logs">log</a></td></tr>'
    )


def proposer_section(loop: LoopView, proposals: list[ProposalView], now: float | None = None) -> str:
    """The section, newest proposals first; empty for a loop without a proposer."""
    view = loop.proposer
    if view is None:
        return ""
    now = time.time() if now is None else now
    counts = " ".join(
        f"{_badge(s.value)} {view.counts.get(s.value, 0)}"
        for s in ProposalStatus
        if view.counts.get(s.value, 0)
    )
    facts = [f"<b>{e(view.kind)}</b>", counts or '<span class="muted">no runs yet</span>']
    if view.failure_streak:
        facts.append(f"{view.failure_streak} failed in a row")
    if view.requests or view.tokens:
        facts.append(f"{view.requests} requests · {view.tokens} tokens")
    idle = e(view.idle_reason) if view.idle_reason else "proposing as slots free up"
    facts.append(f'<span class="muted">{idle}</span>')
    rows = "".join(_row(p, now) for p in proposals) or (
        '<tr><td colspan="7" class="muted">no proposer runs yet</td></tr>'
    )
    head = "".join(f"<th>{h}</th>" for h in ("#", "status", "time", "description", "reason", "made", ""))
    lid = e(loop.id)
    return (
        '<section id="proposer" data-live><h2>Proposer <span class="muted">(latest runs, newest first;'
        f' all in <a href="/v1/loops/{lid}/proposals">proposals</a>)</span></h2>'
        f'<p id="proposer-state">{" · ".join(facts)}</p>'
        f'<table id="proposals"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>'
    )
