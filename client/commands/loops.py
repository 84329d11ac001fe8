"""`ratchet loop create|list|show|pause|resume|stop`."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import click
from rich.console import Group

from ..loopdir import loop_body
from ..terminal import echo
from .common import CliError, CliState, pass_state, resolve_loop
from .views import experiments_table, loop_summary, loops_table

__all__ = ["loop"]


@click.group()
def loop() -> None:
    """Create, inspect and control loops."""


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The loop-body keys set by flags (flags left out keep the file's value)."""
    direction = flags.pop("direction")
    metric = {"name": flags.pop("metric"), "direction": direction, "min_delta": flags.pop("min_delta")}
    resources = {k: flags.pop(k) for k in ("cpus", "memory_mb", "gpus")}
    env = dict(_env_pair(pair) for pair in flags.pop("env"))
    out: dict[str, Any] = {
        "name": flags["name"],
        "editable": list(flags["editable"]) or None,
        "time_budget_s": flags["budget"],
        "timeout_s": flags["timeout"],
        "image": flags["image"],
        "command": flags["command"],
        "max_experiments": flags["max_experiments"],
        "deadline": _deadline(flags["deadline"]) if flags["deadline"] else None,
        "runtime": flags["runtime"],
        "acceptance": {"rule": flags["acceptance"]} if flags["acceptance"] else None,
        "metric": {k: v for k, v in metric.items() if v is not None},
        "resources": {k: v for k, v in resources.items() if v is not None},
        "env": env,
    }
    return {k: v for k, v in out.items() if v not in (None, {})}


_SPAN = re.compile(r"^\+?(\d+(?:\.\d+)?)([smhd])$")


def _deadline(when: str) -> str:
    """RFC 3339 as it is, or a span from now (`90m`, `8h`, `2d`) as the UTC instant it ends."""
    m = _SPAN.match(when.strip())
    if m is None:
        return when
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return end.replace(microsecond=0).isoformat()


def _env_pair(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise CliError(f"--env {pair!r}: expected KEY=VALUE", 2)
    return key, value


@loop.command()
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", help="loop name (default: from the file, else the directory's name)")
@click.option("--editable", multiple=True, metavar="GLOB", help="files candidates may change; repeatable")
@click.option("--metric", metavar="NAME", help="the metric the workload prints (default val_bpb)")
@click.option("--minimize", "direction", flag_value="minimize", default=None, help="lower is better")
@click.option("--maximize", "direction", flag_value="maximize", help="higher is better")
@click.option("--min-delta", type=float, metavar="X", help="a keep must beat the best by more than X")
@click.option("--budget", type=float, metavar="S", help="time budget per experiment, seconds")
@click.option(
    "--timeout", type=float, metavar="S", help="hard kill after S seconds (default 2 x budget + 30 s)"
)
@click.option("--image", help="container image (default: the service's)")
@click.option("--command", metavar="CMD", help='what to run, e.g. "python3 train.py"')
@click.option("--cpus", type=float, metavar="C")
@click.option("--memory-mb", type=int, metavar="M")
@click.option("--gpus", type=int, metavar="G")
@click.option("--env", multiple=True, metavar="KEY=VALUE", help="environment for the workload; repeatable")
@click.option("--max-experiments", type=int, metavar="N")
@click.option(
    "--deadline",
    metavar="WHEN",
    help="no new candidate after WHEN: RFC 3339 with a zone, or 90m, 8h, 2d from now",
)
@click.option("--runtime", type=click.Choice(["runc", "runsc"]))
@click.option(
    "--acceptance",
    type=click.Choice(["strict", "confirm", "significant"]),
    help="when a better-looking candidate is kept (see the README, 'Trusting the ledger')",
)
@click.option("-q", "--quiet", is_flag=True, help="print only the loop id")
@pass_state
def create(state: CliState, directory: Path, quiet: bool, **flags: Any) -> None:
    """Create a loop from a directory.

    The files of DIR are the workspace, DIR/ratchet.toml (or ratchet.json) holds the settings, and
    flags override the file. The unmodified baseline is queued at once."""
    created = state.client.create_loop(loop_body(directory, _overrides(flags)))
    if quiet:
        click.echo(created["id"])
        return
    echo(f"created loop {created['name']} ({created['id']}); the baseline is queued")
    echo(f"watch it with: ratchet watch {created['name']}")


@loop.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """All loops with their state, best metric and experiment counts."""
    loops = state.client.list_loops()
    if as_json:
        click.echo(json.dumps(loops, indent=2))
    elif not loops:
        click.echo("no loops yet; create one with `ratchet loop create DIR`")
    else:
        state.show(loops_table(loops))


@loop.command()
@click.argument("loop_ref", metavar="LOOP")
@click.option("-n", "--last", default=10, show_default=True, help="recent experiments to list")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@pass_state
def show(state: CliState, loop_ref: str, last: int, as_json: bool) -> None:
    """One loop: settings, best so far, counts and the last experiments. LOOP is an id or a name."""
    lp = resolve_loop(state.client, loop_ref)
    if as_json:
        click.echo(json.dumps(lp, indent=2))
        return
    best = state.client.experiment(lp["best_experiment"]) if lp.get("best_experiment") else None
    recent = state.client.recent_experiments(lp, last) if last > 0 else []
    state.show(Group(loop_summary(lp, best), "", experiments_table(recent, lp)))


def _control(action: str, done: str) -> click.Command:
    @click.argument("loop_ref", metavar="LOOP")
    @pass_state
    def command(state: CliState, loop_ref: str) -> None:
        lp = resolve_loop(state.client, loop_ref)
        after = state.client.control(lp["id"], action)
        echo(f"loop {after['name']} ({after['id']}): {after['state']}")

    command.__doc__ = done
    return loop.command(action)(command)


pause = _control("pause", "Pause LOOP: nothing new starts; running experiments finish.")
resume = _control("resume", "Resume LOOP: queued experiments are dispatched again.")
stop = _control("stop", "Stop LOOP for good: queued and running experiments are cancelled.")
