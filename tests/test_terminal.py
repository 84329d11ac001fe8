"""Untrusted text reaches the operator's terminal escaped: a candidate that prints an OSC title
sequence (`ESC ] 0 ; … BEL`), a description that holds one, C1 controls and bidirectional overrides
come out of every `ratchet` command as visible escapes, while the API keeps their bytes."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

import pytest
from click.testing import CliRunner
from conftest import ROOT
from test_api import make_loop

from client.terminal import SafeStream, clean, safe
from service.cli import cli

TITLE = "\x1b]0;pwned\x07"
SHOWN = "\\x1b]0;pwned\\x07"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")

# Prints the title sequence on stdout and stderr, a C1 CSI and a right-to-left override, then
# crashes (so `submit --wait` shows its log tail) or reports a metric.
HOSTILE = (
    "import sys\n"
    "CRASH = False\n"
    "print('before \\x1b]0;pwned\\x07 after', flush=True)\n"
    "sys.stderr.write('err \\x1b]0;pwned\\x07 \\x9b2J \\u202eevil\\n'); sys.stderr.flush()\n"
    "print('---')\n"
    "print('val_bpb: 0.5')\n"
    "sys.exit(1 if CRASH else 0)\n"
)


def test_safe_escapes_controls_but_newlines_and_tabs():
    assert safe(f"a{TITLE}b") == f"a{SHOWN}b"
    assert safe("x\ty\nz") == "x\ty\nz"
    assert safe("one\r\ntwo\rthree") == "one\ntwo\nthree"  # nothing can be written over
    assert safe("\x00\x08\x0b\x1f\x7f") == "\\x00\\x08\\x0b\\x1f\\x7f"
    assert safe("\x80\x9b\x9f") == "\\x80\\x9b\\x9f"
    assert safe("\u202eevil\u2066") == "\\u202eevil\\u2066"
    assert safe("ünïcödé ✓ 日本") == "ünïcödé ✓ 日本"
    assert clean({"a\x1b": [f"{TITLE}", 1, None]}) == {"a\\x1b": [SHOWN, 1, None]}
    stream = SafeStream()
    assert stream.feed("a\r") + stream.feed("\nb\x1b") + stream.feed("c") == "a\nb\\x1bc"


def ratchet(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--url", url, *args], catch_exceptions=False)
    return result.output


def assert_escaped(text: str, what: str) -> None:
    for raw in RAW:
        assert raw not in text, f"{what}: {raw!r} reached the terminal raw:\n{text!r}"


def on_a_terminal(url: str, *args: str) -> bytes:
    """`ratchet ARGS` as a user runs it: on a pseudo-terminal, everything it wrote."""
    leader, follower = pty.openpty()
    env = {**os.environ, "RATCHET_URL": url, "COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "ratchet"), *args], stdout=follower, stderr=follower, env=env, cwd=ROOT
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the program exited and the terminal closed
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(leader)
    return out


@pytest.mark.timeout(240)
def test_a_title_sequence_from_a_candidate_and_a_description_arrives_escaped(server, tmp_path):
    url = server.url
    loop = make_loop(server, name="hostile", workspace={"files": {"train.py": HOSTILE}})
    server.wait_idle(loop["id"])
    crash = HOSTILE.replace("CRASH = False", "CRASH = True")
    (tmp_path / "train.py").write_text(crash)

    # submit --wait: the description is echoed, the crash's log tail shown.
    args = [
        "submit",
        loop["id"],
        "--file",
        str(tmp_path / "train.py"),
        "--root",
        str(tmp_path),
        "-m",
        f"desc {TITLE}",
    ]
    result = CliRunner().invoke(cli, ["--url", url, *args, "--wait"], catch_exceptions=False)
    assert result.exit_code == 3, result.output
    assert_escaped(result.output, "submit --wait")
    assert f"err {SHOWN}" in result.output and "\\x9b2J" in result.output and "\\u202eevil" in result.output
    exps = server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"]
    crashed = exps[-1]
    assert crashed["status"] == "crash"

    # The API keeps the bytes as they were.
    assert crashed["description"] == f"desc {TITLE}"
    api_log = server.client.get(f"/v1/experiments/{crashed['id']}/logs").text
    assert f"before {TITLE} after" in api_log and "\x9b2J" in api_log

    outputs = {
        "logs": ratchet(url, "logs", crashed["id"]),
        "logs -f": ratchet(url, "logs", "-f", crashed["id"]),
        "results": ratchet(url, "results", loop["id"]),
        "watch --once": ratchet(url, "watch", loop["id"], "--once"),
        "loop show": ratchet(url, "loop", "show", loop["id"]),
        "loop list": ratchet(url, "loop", "list"),
        "diff": ratchet(url, "diff", crashed["id"]),
    }
    for what, text in outputs.items():
        assert_escaped(text, what)
    assert f"before {SHOWN} after" in outputs["logs"] and f"before {SHOWN} after" in outputs["logs -f"]
    assert f"desc {SHOWN}" in outputs["results"]
    assert f"desc {SHOWN}" in outputs["watch --once"] and f"desc {SHOWN}" in outputs["loop show"]

    # On a real terminal too (rich styles it there: its own colour codes, never an OSC or a BEL).
    for args in (["logs", crashed["id"]], ["watch", loop["id"], "--once"]):
        shown = on_a_terminal(url, *args)
        assert b"\x1b]" not in shown and b"\x07" not in shown and "\u202e".encode() not in shown, shown
        assert SHOWN.encode() in shown
