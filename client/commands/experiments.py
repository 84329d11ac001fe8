"""`ratchet submit`, `ratchet logs`, `ratchet diff`, `ratchet proposals`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from service.models import FAILED, Status

from ..api import ApiError
from ..terminal import SafeStream, echo, safe
from .common import FAILED_OR_ERROR, CliError, CliState, fmt_metric, pass_state, resolve_loop
from .views import proposals_table

__all__ = ["EXIT_CODES", "diff", "logs", "proposals", "submit"]

# What `submit --wait` exits with, so a script can branch on the verdict.
EXIT_CODES = {
    Status.keep: 0,
    Status.discard: 0,
    **dict.fromkeys(FAILED, 3),  # the candidate failed
    Status.cancelled: 4,  # the machine (or a person) stopped it: submit again
    Status.error: 4,
}
TAIL_LINES = 20


def _workspace_files(paths: tuple[Path, ...], root: Path) -> dict[str, str]:
    """{workspace path: text} for each local file, its path taken relative to ROOT."""
    top = Path(os.path.abspath(root))
    files: dict[str, str] = {}
    for path in paths:
        try:
            rel = Path(os.path.abspath(path)).relative_to(top).as_posix()
        except ValueError:
            raise CliError(f"{path} is not inside {root}; run from the workspace or pass --root", 2) from None
        try:
            files[rel] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CliError(f"{path} is not UTF-8 text; candidates can only change text files", 2) from None
    return files


@contextlib.contextmanager
def _spinner(state: CliState, message: str) -> Iterator[None]:
    console = state.err
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def _report(exp: dict[str, Any], metric_name: str) -> None:
    metric = f"  {metric_name} {fmt_metric(exp.get('metric'))}" if exp.get("metric") is not None else ""
    echo(f"experiment {exp['id']} (#{exp['number']}): {exp['status']}{metric}")
    if exp.get("reason"):
        echo(f"reason: {exp['reason']}")
    if exp["status"] in FAILED_OR_ERROR and exp.get("log_tail"):
        tail = safe(exp["log_tail"]).rstrip("\n").splitlines()[-TAIL_LINES:]
        echo(f"log tail (full log: ratchet logs {exp['id']}):")
        for line in tail:
            click.echo(f"  {line}")


@click.command()
@click.argument("loop_ref", metavar="LOOP")
@click.option(
    "--patch", "patch_file", type=click.File("r", encoding="utf-8"), help="a unified diff; - reads stdin"
)
@click.option(
    "--file",
    "paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a whole edited file, sent under its path relative to --root; repeatable",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="the local workspace --file paths are relative to",
)
@click.option("-m", "--message", "description", required=True, help="what the candidate changes and why")
@click.option("--parent", metavar="SNAP", help="snapshot (or commit) the edit is against (default: best)")
@click.option("--wait", is_flag=True, help="wait for the verdict; exit 0 keep/discard, 3 crash/timeout")
@click.option("-q", "--quiet", is_flag=True, help="print only the experiment id (without --wait)")
@pass_state
def submit(
    state: CliState,
    loop_ref: str,
    patch_file: IO[str] | None,
    paths: tuple[Path, ...],
    root: Path,
    description: str,
    parent: str | None,
    wait: bool,
    quiet: bool,
) -> None:
    """Submit a candidate edit to LOOP.

    The edit is a unified diff (--patch) or whole files (--file). With --wait, waits for the
    verdict and exits 0 for keep or discard, 3 for crash or timeout, 4 for cancelled or error
    (the infrastructure failed: submit again)."""
    if (patch_file is None) == (not paths):
        raise click.UsageError("give either --patch FILE or one or more --file PATH")
    patch = patch_file.read() if patch_file is not None else None
    files = _workspace_files(paths, root) if paths else None
    lp = resolve_loop(state.client, loop_ref)
    exp = state.client.submit(lp["id"], description, patch=patch, files=files, parent=parent)
    if quiet and not wait:
        click.echo(exp["id"])
        return
    if exp.get("duplicate_of"):
        echo(
            f"already ran in loop {lp['name']} as experiment {exp['id']} (#{exp['number']}):"
            f" {exp['status']}; nothing new was queued (rerun it on purpose with POST .../rerun)"
        )
    else:
        echo(f"submitted experiment {exp['id']} (#{exp['number']}) to loop {lp['name']}: {exp['status']}")
    if not wait:
        return
    with _spinner(state, f"waiting for experiment #{exp['number']}"):
        done = state.client.wait(exp["id"], timeout=math.inf)
    _report(done, lp["config"]["metric"]["name"])
    sys.exit(EXIT_CODES.get(done["status"], 1))


def _kind(state: CliState, run_id: str) -> tuple[str, dict[str, Any]]:
    """Whether RUN_ID is an experiment or a proposer run, and its view."""
    try:
        return "experiments", state.client.experiment(run_id)
    except ApiError as exc:
        if exc.status != 404:
            raise
    try:
        return "proposals", state.client.proposal(run_id)
    except ApiError as exc:
        if exc.status != 404:
            raise
    raise CliError(f"no experiment or proposal {run_id}", 1)


@click.command()
@click.argument("exp_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="keep printing while it runs")
@pass_state
def logs(state: CliState, exp_id: str, follow: bool) -> None:
    """Print the log of an experiment or a proposer run.

    With -f, keep printing while ID runs, until it ends."""
    kind, _ = _kind(state, exp_id)
    if not follow:
        echo(state.client.logs(exp_id, kind=kind), nl=False)
        return
    stream = SafeStream()
    for chunk in state.client.follow_logs(exp_id, kind=kind):
        click.echo(stream.feed(chunk), nl=False)
        sys.stdout.flush()
    _, run = _kind(state, exp_id)
    reason = f" ({run['reason']})" if run.get("reason") else ""
    what = "experiment" if kind == "experiments" else "proposal"
    echo(f"-- {what} {exp_id} ended: {run['status']}{reason}", err=True)


@click.command()
@click.argument("loop_ref", metavar="LOOP")
@click.option("-n", "--last", default=20, show_default=True, help="recent proposer runs to list")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON instead of a table")
@pass_state
def proposals(state: CliState, loop_ref: str, last: int, as_json: bool) -> None:
    """List a loop's proposer runs.

    What LOOP's proposer made of each run: its candidate's experiment id, the earlier experiment
    a duplicate repeated, or why it failed (`ratchet logs ID` shows a run's log)."""
    lp = resolve_loop(state.client, loop_ref)
    if not lp.get("proposer"):
        raise CliError(f"loop {lp['name']} has no proposer: its candidates come over REST", 1)
    props = state.client.recent_proposals(lp, max(1, last))
    if as_json:
        click.echo(json.dumps(props, indent=1))
        return
    state.show(proposals_table(list(reversed(props)), title=f"{lp['name']}: proposer runs, newest first"))


@click.command()
@click.argument("exp_id", metavar="EXP")
@pass_state
def diff(state: CliState, exp_id: str) -> None:
    """Print an experiment's diff.

    The unified diff of EXP against its parent; empty for a baseline."""
    echo(state.client.diff(exp_id), nl=False)
