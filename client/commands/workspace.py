"""`ratchet results` and `ratchet pull`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from ..api import RatchetClient
from ..loopdir import extract_archive
from ..terminal import echo
from .common import CliError, CliState, fmt_metric, pass_state, resolve_loop

__all__ = ["pull", "results"]


@click.command()
@click.argument("loop_ref", metavar="LOOP")
@pass_state
def results(state: CliState, loop_ref: str) -> None:
    """Print a loop's ledger (results.tsv).

    One row per finished experiment of LOOP, in finishing order."""
    lp = resolve_loop(state.client, loop_ref)
    echo(state.client.results(lp["id"]), nl=False)


def _snapshot(
    client: RatchetClient, lp: dict[str, Any], ref: str | None
) -> tuple[str, dict[str, Any] | None]:
    """(full snapshot id, the experiment that made it if known) for REF: a full id, a commit or an id
    prefix of one of LOOP's experiments; None means the loop's best."""
    if ref is None:
        if not lp.get("best_snapshot"):
            raise CliError(f"loop {lp['name']} has no best snapshot yet: no baseline has succeeded")
        best = client.experiment(lp["best_experiment"]) if lp.get("best_experiment") else None
        return lp["best_snapshot"], best
    ref = ref.lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", ref):
        raise CliError(f"--snapshot {ref!r}: expected a snapshot id or commit (hex)", 2)
    matches = {e["snapshot"]: e for e in client.all_experiments(lp["id"]) if e["snapshot"].startswith(ref)}
    if len(matches) > 1:
        raise CliError(f"--snapshot {ref!r} matches {len(matches)} snapshots; give more digits", 2)
    if matches:
        return next(iter(matches.items()))
    if len(ref) == 64:  # not made by this loop's experiments, but the service may still hold it
        return ref, None
    raise CliError(f"no snapshot {ref!r} in loop {lp['name']} (commits are in `ratchet results`)", 2)


@click.command()
@click.argument("loop_ref", metavar="LOOP")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--snapshot", "snapshot_ref", metavar="ID", help="snapshot id or commit (default: the best)")
@click.option("--force", is_flag=True, help="write into a non-empty DIR, replacing same-named files")
@click.option("-q", "--quiet", is_flag=True, help="print only the snapshot id")
@pass_state
def pull(
    state: CliState, loop_ref: str, directory: Path, snapshot_ref: str | None, force: bool, quiet: bool
) -> None:
    """Write a loop's best workspace into DIR.

    The best snapshot of LOOP, or the one given with --snapshot."""
    lp = resolve_loop(state.client, loop_ref)
    snapshot, exp = _snapshot(state.client, lp, snapshot_ref)
    written = extract_archive(state.client.archive(snapshot), directory, force=force)
    if quiet:
        click.echo(snapshot)
        return
    origin = ""
    if exp:
        metric = lp["config"]["metric"]["name"]
        origin = f" from #{exp['number']} {exp['description']!r} ({metric} {fmt_metric(exp.get('metric'))})"
    echo(f"wrote {len(written)} files of snapshot {snapshot}{origin} to {directory}")
