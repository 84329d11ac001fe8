"""The `ratchet` commands that drive a running service over its API (see `client.commands`).
`service.cli` adds `ratchet serve` to them: the program that is both."""

from __future__ import annotations

import click

from .commands import COMMANDS
from .commands.common import DEFAULT_URL, CliState, RatchetGroup

__all__ = ["cli", "main"]


@click.group(cls=RatchetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="RATCHET_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="the Ratchet service (env RATCHET_URL)",
)
@click.option("--token", envvar="RATCHET_TOKEN", help="sent as a bearer token (env RATCHET_TOKEN)")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None) -> None:
    """Autoresearch loops as a service."""
    ctx.obj = CliState(url=url, token=token or None)


for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="ratchet")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0
