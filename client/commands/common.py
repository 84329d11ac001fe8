"""What every client command shares: the connection, errors as one-line messages, finding a loop by
id or name, and formatting."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.text import Text

from service.models import FAILED, Status

from ..api import ApiError, RatchetClient, Unreachable
from ..loopdir import LoopDirError
from ..terminal import safe

__all__ = [
    "FAILED_OR_ERROR",
    "STATUS_STYLE",
    "CliError",
    "CliState",
    "RatchetGroup",
    "elapsed",
    "fmt_metric",
    "fmt_seconds",
    "pass_state",
    "resolve_loop",
    "status_text",
]

DEFAULT_URL = "http://127.0.0.1:8080"
FAILED_OR_ERROR = FAILED | {Status.error}  # the candidate failed, or the machine did
LOOP_ID = re.compile(r"^[0-9a-f]{16}$")
STATUS_STYLE = {
    "queued": "blue",
    "running": "cyan",
    "keep": "bold green",
    "discard": "yellow",
    "crash": "red",
    "timeout": "magenta",
    "cancelled": "dim",
    "error": "bold red",
    "confirming": "green",
    "measured": "dim cyan",
    # proposer runs
    "proposed": "green",
    "duplicate": "yellow",
    "failed": "red",
}


class CliError(click.ClickException):
    """A one-line error: exit 1 for what the service said or could not say, 2 for bad local input.
    The message may quote the service or a name: it is shown escaped."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(safe(message))
        self.exit_code = exit_code


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output (an agent reading it) gets wide tables instead of rich's 80-column default.
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None, markup=False, highlight=False)


@dataclass
class CliState:
    url: str = DEFAULT_URL
    token: str | None = None
    _client: RatchetClient | None = field(default=None, repr=False)

    @property
    def client(self) -> RatchetClient:
        if self._client is None:
            self._client = RatchetClient(self.url, token=self.token)
        return self._client

    @property
    def out(self) -> Console:
        return _console(stderr=False)

    @property
    def err(self) -> Console:
        return _console(stderr=True)

    def show(self, renderable: RenderableType) -> None:
        """Prints a rich renderable; into a pipe without the padding rich adds to every line."""
        console = self.out
        if console.is_terminal:
            console.print(renderable)
            return
        with console.capture() as captured:
            console.print(renderable)
        click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


pass_state = click.make_pass_decorator(CliState, ensure=True)


class RatchetGroup(click.Group):
    """Turns the errors of any subcommand into one line on stderr and an exit code (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Unreachable as exc:
            raise CliError(str(exc)) from exc
        except ApiError as exc:
            raise CliError(f"{exc.detail} (HTTP {exc.status})") from exc
        except LoopDirError as exc:
            raise CliError(str(exc), exit_code=2) from exc
        except TimeoutError as exc:
            raise CliError(str(exc)) from exc


def resolve_loop(client: RatchetClient, ref: str) -> dict[str, Any]:
    """The loop named by REF: its id, its name (the active loop of that name first), or an id prefix."""
    if LOOP_ID.match(ref):
        try:
            return client.loop(ref)
        except ApiError as exc:
            if exc.status != 404:
                raise
    loops = client.list_loops()
    named = [lp for lp in loops if lp["name"] == ref]
    if len(named) > 1:
        named = [lp for lp in named if lp["state"] != "stopped"] or named
    if len(named) == 1:
        return named[0]
    if named:
        ids = ", ".join(lp["id"] for lp in named)
        raise CliError(f"{len(named)} loops are named {ref!r} ({ids}); give the id", 2)
    if re.fullmatch(r"[0-9a-f]{4,16}", ref):
        prefixed = [lp for lp in loops if lp["id"].startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
    raise CliError(f"no loop {ref!r}: neither the id nor the name of a loop (see `ratchet loop list`)", 2)


def fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def elapsed(exp: dict[str, Any]) -> float | None:
    """Seconds the experiment has held (or held) its slot."""
    if exp.get("started_at") is None:
        return None
    end = exp.get("finished_at") or time.time()
    return max(0.0, end - exp["started_at"])
