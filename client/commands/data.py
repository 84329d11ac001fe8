"""`ratchet datasets` and `ratchet cache clear|fill LOOP`: the data loops may name, and a loop's cache."""

from __future__ import annotations

import json
import math

import click

from .common import CliState, pass_state, resolve_loop
from .views import cache_text

__all__ = ["cache", "datasets"]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@pass_state
def datasets(state: CliState, as_json: bool) -> None:
    """The datasets the service's operator declared, by name (loops name them in `datasets`)."""
    found = state.client.datasets()
    if as_json:
        click.echo(json.dumps(found, indent=2))
    elif not found:
        click.echo(
            "no datasets declared; the operator declares them with `ratchet serve --dataset NAME=PATH`"
        )
    else:
        click.echo("\n".join(d["name"] for d in found))


@click.group()
def cache() -> None:
    """A loop's cache: what its unmodified baseline left in its cache directory (compile caches,
    downloads). Every run gets a private copy; only a baseline run fills it."""


@cache.command()
@click.argument("loop_ref", metavar="LOOP")
@pass_state
def clear(state: CliState, loop_ref: str) -> None:
    """Forget LOOP's cache (after an image rebuild, say); the next baseline run fills it again."""
    loop = resolve_loop(state.client, loop_ref)
    after = state.client.clear_cache(loop["id"])
    click.echo(f"{after['name']}: cache {cache_text(after.get('cache'))}")


@cache.command()
@click.argument("loop_ref", metavar="LOOP")
@click.option("--wait", is_flag=True, help="wait until that baseline run has finished")
@pass_state
def fill(state: CliState, loop_ref: str, wait: bool) -> None:
    """Clear LOOP's cache and queue a baseline run that fills it."""
    loop = resolve_loop(state.client, loop_ref)
    exp = state.client.fill_cache(loop["id"])
    click.echo(f"{loop['name']}: baseline run #{exp['number']} ({exp['id']}) queued to fill the cache")
    if wait:
        done = state.client.wait(exp["id"], timeout=math.inf)
        after = state.client.loop(loop["id"])
        click.echo(f"#{done['number']} {done['status']}; cache {cache_text(after.get('cache'))}")
