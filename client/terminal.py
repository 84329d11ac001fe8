"""Text from the service, made safe to show on a terminal.

Logs, descriptions, reasons and names are written by candidates and agents. A control character
among them reaches a terminal as a command: an escape sequence sets the window title, moves the
cursor, rewrites or hides what was shown, and on some terminals answers back into the shell's input.
So everything the CLI prints that came from the service goes through `safe`: C0 and C1 control
characters, DEL and the bidirectional overrides (which reorder what a line seems to say) are shown
escaped (`\\x1b`, `\\x9b`, `\\u202e`); newline and tab pass; a carriage return becomes a newline
(as in a followed log, whose server-sent events carry text by lines): nothing shown can be written
over. The API itself keeps every byte as it was; only what is printed here is escaped.
"""

from __future__ import annotations

import re
from typing import Any

import click

__all__ = ["SafeStream", "clean", "echo", "safe"]

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """`text` with every character a terminal would act on shown escaped (see the module)."""
    return _UNSAFE.sub(_escaped, text.replace("\r\n", "\n").replace("\r", "\n"))


def clean(value: Any) -> Any:
    """`value` (an API answer: dicts, lists, strings, numbers) with every string `safe`."""
    if isinstance(value, str):
        return safe(value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def echo(text: str, **kwargs: Any) -> None:
    click.echo(safe(text), **kwargs)


class SafeStream:
    """`safe` for text that arrives in pieces: a CRLF split between two pieces is one newline."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, text: str) -> str:
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        if text:
            self._after_cr = text.endswith("\r")
        return safe(text)
