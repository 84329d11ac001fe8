"""`ratchet backup DEST` and `ratchet restore SRC --data-dir DIR`: they read and write data dirs on
this machine (see `state.backup` and `state.restore`), so they live with the server, not the client."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import click

from client.api import ApiError, Unreachable
from client.commands.common import CliState, pass_state

from .state.backup import BackupError, backup
from .state.restore import RestoreError, restore

__all__ = ["backup_command", "restore_command"]


class _Progress:
    """One line per phase; on a terminal it is redrawn in place, elsewhere printed every few seconds."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.phase: str | None = None
        self.last = 0.0
        self.t0 = time.monotonic()

    def __call__(self, phase: str, done: int, total: int, nbytes: int) -> None:
        now = time.monotonic()
        if phase != self.phase:
            if self.phase is not None and self.tty:
                click.echo("", err=True)
            self.phase, self.last = phase, 0.0
        final = done >= total
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        size = f", {_mib(nbytes)}" if nbytes else ""
        line = f"{phase:>15}: {done}/{total}{size}  [{now - self.t0:.1f} s]"
        if self.tty:
            click.echo(f"\r{line}", nl=False, err=True)
        else:
            click.echo(line, err=True)

    def end(self) -> None:
        if self.tty and self.phase is not None:
            click.echo("", err=True)


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _running_service_data_dir(state: CliState) -> Path:
    """The data dir of the service at --url, as it reports it (admin)."""
    try:
        info = state.client.service_info()
    except Unreachable as exc:
        raise click.ClickException(
            f"{exc}; or name the data dir with --data-dir (or RATCHET_DATA_DIR)"
        ) from exc
    except ApiError as exc:
        raise click.ClickException(
            f"the service at {state.url} would not say where its data dir is ({exc.detail});"
            " name it with --data-dir, or pass an admin token (--token)"
        ) from exc
    path = Path(info["data_dir"])
    if not (path / "ratchet.db").is_file():
        raise click.ClickException(
            f"the service at {state.url} keeps its data in {path}, which is not on this machine (it runs"
            " in a container or elsewhere); run the backup where the data dir is, e.g."
            " `docker compose exec ratchet ratchet backup /data/backups/NAME`"
        )
    return path


@click.command("backup")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="the data dir to copy (default: RATCHET_DATA_DIR, else the one of the service at --url)",
)
@pass_state
def backup_command(state: CliState, dest: Path, data_dir: Path | None) -> None:
    """Copy a data dir, consistently, into the new directory DEST while its service runs."""
    if data_dir is None:
        env = os.environ.get("RATCHET_DATA_DIR")
        data_dir = Path(env) if env else _running_service_data_dir(state)
    click.echo(f"backing up {data_dir} to {dest}", err=True)
    progress = _Progress()
    try:
        made = backup(data_dir, dest, progress)
    except BackupError as exc:
        progress.end()
        raise click.ClickException(str(exc)) from exc
    progress.end()
    c = made.counts
    total = sum(f.size for f in made.files)
    click.echo(
        f"backup {dest}: {c['loops']} loop(s), {c['experiments']} experiment(s) ({c['running']} running and"
        f" {c['queued']} queued at the time: a restore has them queued again), {c['snapshots']} snapshot(s),"
        f" {c['blobs']} blob(s), {c['logs']} log(s), {_mib(total)}"
    )


@click.command("restore")
@click.argument("src", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="the new data dir (must not exist, or be empty)",
)
@click.option("--paused", is_flag=True, help="pause every active loop: nothing runs until it is resumed")
def restore_command(src: Path, data_dir: Path, paused: bool) -> None:
    """Check the backup SRC and write it out as the fresh data dir --data-dir."""
    click.echo(f"restoring {src} into {data_dir}", err=True)
    progress = _Progress()
    try:
        done = asyncio.run(restore(src, data_dir, progress, pause=paused))
    except RestoreError as exc:
        progress.end()
        raise click.ClickException(str(exc)) from exc
    progress.end()
    c = done.manifest.counts
    queued = (
        f"; {len(done.requeued)} experiment(s) that were running are queued again" if done.requeued else ""
    )
    held = f"; {len(done.paused)} loop(s) paused" if done.paused else ""
    click.echo(
        f"restored {c['loops']} loop(s), {c['experiments']} experiment(s), {c['snapshots']} snapshot(s),"
        f" {c['blobs']} blob(s), {c['logs']} log(s) into {data_dir}: start-up check clean{queued}{held}."
        f" Start it with: ratchet serve --data-dir {data_dir}"
    )
