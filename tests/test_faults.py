"""The test-only crash hook itself (service/faults.py), in a child process it is allowed to kill."""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
from service import faults
faults.arm({spec!r})
faults.point("other")
print("first", flush=True)
with faults.scope("decide"):
    faults.scoped_point("before_commit")
print("second", flush=True)
faults.point("run.prepared")
print("third", flush=True)
"""


def _run(spec: str | None) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(spec=spec)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_unarmed_points_do_nothing():
    done = _run(None)
    assert done.returncode == 0 and done.stdout.split() == ["first", "second", "third"]


def test_the_armed_point_kills_the_process_at_its_nth_hit():
    done = _run("decide.before_commit")
    assert done.returncode == -signal.SIGKILL and done.stdout.split() == ["first"]
    assert "fault point decide.before_commit reached" in done.stderr
    assert _run("run.prepared@2").returncode == 0  # reached once only: the second hit never comes
    done = _run("run.prepared@1")
    assert done.returncode == -signal.SIGKILL and done.stdout.split() == ["first", "second"]
