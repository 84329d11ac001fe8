"""The client side of `ratchet`: commands that drive a running service over its v1 API."""

from __future__ import annotations

import click

from .data import cache, datasets
from .experiments import diff, logs, proposals, submit
from .loops import loop
from .tokens import token
from .watch import watch
from .workspace import pull, results

__all__ = ["COMMANDS"]

COMMANDS: tuple[click.Command, ...] = (
    loop, submit, watch, logs, proposals, diff, results, pull, token, datasets, cache
)
