"""`ratchet watch`: a live view of one loop."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from ..api import RatchetClient, Unreachable
from .common import CliState, pass_state, resolve_loop
from .views import experiments_table, loop_summary, proposals_table, running_table

__all__ = ["watch"]

PROPOSALS_SHOWN = 5


class _Frames:
    """Fetches what one frame shows; the best experiment is fetched once per change of best."""

    def __init__(self, client: RatchetClient, loop_id: str, last: int) -> None:
        self.client, self.loop_id, self.last = client, loop_id, last
        self.best: dict[str, Any] | None = None

    def render(self) -> RenderableType:
        lp = self.client.loop(self.loop_id)
        best_id = lp.get("best_experiment")
        if best_id and (self.best is None or self.best["id"] != best_id):
            self.best = self.client.experiment(best_id)
        running = self.client.experiments(self.loop_id, status=["running"], limit=50)["items"]
        recent = self.client.recent_experiments(lp, self.last)
        stamp = Text(f"{time.strftime('%H:%M:%S')}  Ctrl-C to quit", style="dim")
        parts: list[RenderableType] = [loop_summary(lp, self.best if best_id else None), ""]
        if lp.get("proposer"):
            props = self.client.recent_proposals(lp, PROPOSALS_SHOWN)
            parts += [proposals_table(list(reversed(props)), title="proposer runs, newest first"), ""]
        parts += [
            running_table(running, lp),
            "",
            experiments_table(list(reversed(recent)), lp, title=f"last {len(recent)}, newest first"),
            stamp,
        ]
        return Group(*parts)


@click.command()
@click.argument("loop_ref", metavar="LOOP")
@click.option("-n", "--last", default=15, show_default=True, help="recent experiments to show")
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one frame and exit")
@pass_state
def watch(state: CliState, loop_ref: str, last: int, interval: float, once: bool) -> None:
    """Watch a loop live.

    Shows LOOP's best so far, its proposer's latest runs (when it carries one), running
    experiments against the time budget, and the latest experiments with their verdicts;
    refreshes every second."""
    lp = resolve_loop(state.client, loop_ref)
    frames = _Frames(state.client, lp["id"], max(1, last))
    if once:
        state.show(frames.render())
        return
    frame = frames.render()
    try:
        with Live(frame, console=state.out, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    frame = frames.render()
                    live.update(frame, refresh=True)
                except Unreachable as exc:  # a restarting service: keep the last frame and retry
                    live.update(Group(frame, Text(f"{exc} (retrying)", style="bold red")), refresh=True)
    except KeyboardInterrupt:
        pass
