"""`ratchet token create|list|revoke`: API tokens (needs an admin token, or a service with auth none)."""

from __future__ import annotations

import json
import time

import click
from rich import box
from rich.table import Table

from ..terminal import clean, echo
from .common import CliState, pass_state

__all__ = ["token"]

SCOPES = ("read", "submit", "admin")


@click.group()
def token() -> None:
    """Create, list and revoke API tokens."""


@token.command()
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES), help="repeatable")
@click.option("--loop", "loops", multiple=True, metavar="LOOP", help="submit only to this loop (name or id)")
@click.option("-q", "--quiet", is_flag=True, help="print only the secret")
@pass_state
def create(state: CliState, name: str, scopes: tuple[str, ...], loops: tuple[str, ...], quiet: bool) -> None:
    """Create a token NAME. Its secret is printed once and cannot be shown again."""
    made = state.client.create_token(name, scopes, list(loops) or None)
    if quiet:
        click.echo(made["secret"])
        return
    where = ", ".join(made["loops"]) if made.get("loops") else "all loops"
    echo(f"token {made['name']} ({made['id']}): {', '.join(made['scopes'])} on {where}")
    click.echo(made["secret"])
    click.echo("store it now: it is not shown again (use it as --token or RATCHET_TOKEN)", err=True)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@pass_state
def list_(state: CliState, as_json: bool) -> None:
    """All tokens: id, name, scopes, loops, created and last used (never the secrets)."""
    tokens = state.client.list_tokens()
    if as_json:
        click.echo(json.dumps(tokens, indent=2))
        return
    if not tokens:
        click.echo("no tokens yet; create one with `ratchet token create NAME --scope read`")
        return
    tokens = clean(tokens)  # names are anyone's text: shown escaped
    table = Table(title="tokens", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("id", "name", "scopes", "loops", "created", "last used"):
        table.add_column(column, no_wrap=True)
    for t in tokens:
        loops = ",".join(t["loops"]) if t.get("loops") else "all"
        table.add_row(
            t["id"], t["name"], ",".join(t["scopes"]), loops, _when(t["created_at"]), _when(t["last_used_at"])
        )
    state.show(table)


@token.command()
@click.argument("token_id", metavar="ID")
@pass_state
def revoke(state: CliState, token_id: str) -> None:
    """Revoke token ID; requests with it are refused from now on."""
    state.client.revoke_token(token_id)
    click.echo(f"token {token_id} revoked")
