"""`ratchet`: the client's commands (see `client.cli`) plus `ratchet serve`, which runs the service,
and `ratchet version`. The client never imports the server; this module puts the two together."""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

import click

from client.cli import cli, main

from .backup_commands import backup_command, restore_command
from .settings import Settings, SettingsError, load_settings

__all__ = ["cli", "main"]

_DEFAULTS = Settings()


@cli.command()
@click.option("--host", help=f"bind address (default {_DEFAULTS.host}; env RATCHET_HOST)")
@click.option("--port", type=int, help=f"port (default {_DEFAULTS.port}; env RATCHET_PORT)")
@click.option("--data-dir", help=f"database, snapshots and logs (default {_DEFAULTS.data_dir})")
@click.option("--slots", type=int, help="concurrent experiments (default: one per GPU, else 1)")
@click.option("--gpus", help="comma-separated GPU ids to use (default: detect with nvidia-smi)")
@click.option("--runtime", type=click.Choice(["runc", "runsc"]), help="default container runtime")
@click.option("--image", "default_image", help=f"default image (default {_DEFAULTS.default_image})")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--auth",
    type=click.Choice(["none", "tokens"]),
    help="bearer tokens or none (default: none on a loopback address, else tokens; env RATCHET_AUTH)",
)
@click.option("--admin-token", help="bootstrap admin token, 16+ characters (env RATCHET_ADMIN_TOKEN)")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    help="where experiments run: the local engine (default) or a Ray cluster (env RATCHET_EXECUTOR)",
)
@click.option("--ray-address", help="the Ray cluster's GCS host:port (env RATCHET_RAY_ADDRESS)")
def serve(**flags: Any) -> None:
    """Run the HTTP service (SQLite + the local container engine, or a Ray cluster's nodes)."""
    if flags.get("gpus") is not None:
        flags["gpus"] = [g.strip() for g in flags["gpus"].split(",") if g.strip()]
    from .http.auth import auth_mode
    from .http.operations import check_settings

    try:
        settings = load_settings(flags)
        auth_mode(settings)
        check_settings(settings)
        if settings.executor == "ray":
            _check_ray(settings)
    except SettingsError as exc:
        click.echo(f"ratchet: {exc}", err=True)
        sys.exit(2)
    import uvicorn

    from .http.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
    )


def _check_ray(settings: Settings) -> None:
    if not settings.ray_address:
        raise SettingsError("--executor ray needs --ray-address (or RATCHET_RAY_ADDRESS)")
    if settings.slots is not None or settings.gpus is not None:
        raise SettingsError(
            "--slots and --gpus are the local engine's: a Ray node's slots come from its GPUs"
            " (one per RATCHET_GPUS_PER_SLOT) or, without GPUs, RATCHET_RAY_CPU_SLOTS"
        )
    if importlib.util.find_spec("ray") is None:
        raise SettingsError(
            "--executor ray needs Ray: pip install --require-hashes -r requirements/ray.txt"
            " (the same Ray as on the cluster's nodes)"
        )


cli.add_command(backup_command)
cli.add_command(restore_command)


@cli.command()
def version() -> None:
    """Print the version."""
    from .http.app import VERSION

    click.echo(f"ratchet {VERSION}")


if __name__ == "__main__":
    sys.exit(main())
