"""Rich renderings of loops and experiments, shared by `loop list/show` and `watch`. What the API
answered is `clean`ed first: names, descriptions and reasons are shown with control characters
escaped (`client.terminal`)."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from service.models import hard_timeout_s

from ..terminal import clean
from .common import FAILED_OR_ERROR, elapsed, fmt_metric, fmt_seconds, status_text

__all__ = [
    "cache_text",
    "experiments_table",
    "loop_summary",
    "loops_table",
    "proposals_table",
    "proposer_text",
    "running_table",
]

ARROW = {"minimize": "↓", "maximize": "↑"}


def _metric_label(loop: dict[str, Any]) -> str:
    metric = loop["config"]["metric"]
    return f"{metric['name']} {ARROW.get(metric['direction'], '')}".strip()


def loops_table(loops: list[dict[str, Any]]) -> Table:
    loops = clean(loops)
    table = Table(title="loops", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("id", "name", "state", "baseline", "metric", "best"):
        table.add_column(name, no_wrap=True, justify="right" if name == "best" else "left")
    for name in ("runs", "keep", "discard", "crash", "running", "queued"):
        table.add_column(name, justify="right", no_wrap=True)
    for lp in loops:
        c = lp.get("counts", {})
        table.add_row(
            lp["id"],
            lp["name"],
            lp["state"],
            lp["baseline"],
            _metric_label(lp),
            fmt_metric(lp.get("best_metric")),
            str(sum(c.values())),
            str(c.get("keep", 0)),
            str(c.get("discard", 0)),
            str(sum(c.get(s, 0) for s in FAILED_OR_ERROR)),
            str(c.get("running", 0)),
            str(c.get("queued", 0)),
        )
    return table


def loop_summary(loop: dict[str, Any], best: dict[str, Any] | None = None) -> Table:
    """Key facts of one loop; BEST is its best experiment when known."""
    loop, best = clean(loop), clean(best)
    cfg = loop["config"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    baseline = loop["baseline"] + (f" ({loop['baseline_reason']})" if loop.get("baseline_reason") else "")
    best_text = fmt_metric(loop.get("best_metric"))
    if best:
        best_text += f"  #{best['number']} {best['commit']} '{best['description']}'"
    metric = cfg["metric"]
    counts = loop.get("counts", {})
    rows = [
        ("loop", f"{loop['name']} ({loop['id']})"),
        ("state", loop["state"]),
        ("baseline", baseline),
        ("metric", f"{metric['name']}, {metric['direction']}, min_delta {metric['min_delta']:g}"),
        ("best", best_text),
        ("budget", f"{cfg['time_budget_s']:g} s (hard kill at {_timeout(cfg):g} s)"),
        ("command", " ".join(cfg["command"])),
        ("editable", ", ".join(cfg["editable"])),
        ("image", f"{cfg.get('image') or '-'} ({cfg.get('runtime') or 'default runtime'})"),
        ("resources", ", ".join(f"{k} {v:g}" for k, v in cfg["resources"].items())),
        ("experiments", "  ".join(f"{k} {v}" for k, v in counts.items() if v) or "none yet"),
    ]
    if cfg.get("max_experiments"):
        rows.append(("max", str(cfg["max_experiments"])))
    if cfg.get("deadline"):
        rows.append(("deadline", str(cfg["deadline"])))
    if loop.get("state_reason"):
        rows.append(("paused", str(loop["state_reason"])))
    if loop.get("proposer"):
        rows.append(("proposer", proposer_text(loop)))
    if cfg.get("datasets"):
        rows.append(("datasets", ", ".join(f"{d['name']} at {d['target']}" for d in cfg["datasets"])))
    rows.append(("cache", cache_text(loop.get("cache"))))
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def cache_text(cache: dict[str, Any] | None) -> str:
    if not cache:
        return "none yet (the first successful baseline run fills it)"
    size = f"{cache['bytes'] / 1e6:.1f} MB in {cache['files']} files"
    if cache["state"] == "too_large":
        return f"not kept: {size}, over the service's RATCHET_CACHE_MAX_MB"
    return f"{size}, filled by {cache['experiment']}"


def _timeout(cfg: dict[str, Any]) -> float:
    return hard_timeout_s(cfg["time_budget_s"], cfg.get("timeout_s"))


def experiments_table(
    exps: list[dict[str, Any]], loop: dict[str, Any], title: str = "recent experiments"
) -> Table:
    """One row per experiment; the loop's best is starred."""
    exps, loop = clean(exps), clean(loop)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column(loop["config"]["metric"]["name"], justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    # Only the free text wraps when the terminal is narrow; ids and numbers stay whole.
    table.add_column("description", overflow="fold")
    table.add_column("reason", overflow="fold")
    for exp in exps:
        best = exp["id"] == loop.get("best_experiment")
        number = Text("★ ", style="bold green") if best else Text()
        table.add_row(
            number + str(exp["number"]),
            exp["id"],
            status_text(exp["status"]),
            Text(fmt_metric(exp.get("metric")), style="bold" if best else ""),
            fmt_seconds(elapsed(exp)),
            Text(exp["description"]),
            Text(exp.get("reason") or ""),
        )
    if not exps:
        table.add_row("", "", "", "", "", Text("none yet", style="dim"), "")
    return table


def running_table(exps: list[dict[str, Any]], loop: dict[str, Any]) -> RenderableType:
    """Running experiments with a bar against the time budget (the workload stops itself there;
    the hard kill comes later)."""
    exps, loop = clean(exps), clean(loop)
    cfg = loop["config"]
    budget, kill = cfg["time_budget_s"], _timeout(cfg)
    if not exps:
        return Text("running: nothing", style="dim")
    table = Table(title="running", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("#", "id", "elapsed", "progress"):
        table.add_column(name, no_wrap=True, justify="right" if name in ("#", "elapsed") else "left")
    table.add_column("description", overflow="fold")
    now = time.time()
    for exp in exps:
        spent = max(0.0, now - exp["started_at"]) if exp.get("started_at") else 0.0
        over = spent > budget
        bar = ProgressBar(
            total=budget, completed=min(spent, budget), width=30, complete_style="yellow" if over else "cyan"
        )
        note = f"{fmt_seconds(spent)} / {budget:g}s" + (f" (kill at {kill:g}s)" if over else "")
        table.add_row(str(exp["number"]), exp["id"], note, bar, Text(exp["description"]))
    return table


def proposer_text(loop: dict[str, Any]) -> str:
    """One line on the loop's proposer: its kind, proposals per status, streak, budget, idling."""
    view = loop.get("proposer") or {}
    counts = view.get("counts") or {}
    parts = [view.get("kind", "?")]
    parts += [f"{k} {v}" for k, v in counts.items() if v]
    if view.get("failure_streak"):
        parts.append(f"{view['failure_streak']} failures in a row")
    if view.get("requests") or view.get("tokens"):
        parts.append(f"{view['requests']} requests, {view['tokens']} tokens")
    idle = view.get("idle_reason")
    parts.append(f"idle: {idle}" if idle else "proposing as slots free up")
    return " · ".join(parts)


def proposals_table(props: list[dict[str, Any]], title: str = "recent proposals") -> Table:
    """One row per proposer run: what it made (the candidate, or the earlier one it repeated) or why
    it failed."""
    props = clean(props)
    table = Table(title=Text(clean(title)), title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("#", "id", "status", "time"):
        table.add_column(name, no_wrap=True, justify="right" if name in ("#", "time") else "left")
    table.add_column("made", no_wrap=True)
    table.add_column("description / reason", overflow="fold")
    for p in props:
        made = p.get("experiment_id") or (f"= {p['duplicate_of']}" if p.get("duplicate_of") else "")
        text = p.get("description") or ""
        if p.get("reason"):
            text = f"{text}  ({p['reason']})" if text else p["reason"]
        table.add_row(
            str(p["number"]), p["id"], status_text(p["status"]), fmt_seconds(elapsed(p)), made, Text(text)
        )
    if not props:
        table.add_row("", "", "", "", "", Text("none yet", style="dim"))
    return table
