"""Crash points, for tests only: with `RATCHET_FAULT_POINT=<name>[@n]` the service SIGKILLs itself
the n-th time (default: the first) it reaches the named point, so a test can prove that a restart
loses nothing at exactly that moment. Off (and a no-op) unless the setting is given.

Points: `run.preparing` (the experiment is `running`, no container yet), `run.prepared` (its
container is up behind the gate), `run.output` (the workload's output arrives: it is running),
`run.exited` (the workload has ended, its outputs are not collected yet), `decide.before` (the
run's log is written, the verdict is not), `decide.before_commit` (inside the verdict's
transaction, before COMMIT), `decide.after` (the verdict is committed), `snapshot.blob_tmp` (a new
blob is fsynced under its temporary name, not yet renamed), `submit.before_commit` (a candidate's
blobs are durable, its rows not yet committed), `propose.running` (a proposal is `running`, nothing
made yet), `propose.prepared` (a command proposer's container is up behind its gate),
`propose.before_commit` (inside the write that queues a proposal's candidate), `propose.after`
(that write is committed).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["arm", "current_scope", "point", "scope", "scoped_point"]

_armed: str | None = None
_left = 0
_scope: ContextVar[str] = ContextVar("ratchet_fault_scope", default="")


def arm(spec: str | None) -> None:
    """`name` or `name@n`; None disarms."""
    global _armed, _left
    if not spec:
        _armed, _left = None, 0
        return
    name, _, count = spec.partition("@")
    _armed, _left = name, int(count or 1)


def point(name: str) -> None:
    global _left
    if name != _armed:
        return
    _left -= 1
    if _left <= 0:
        os.write(2, f"ratchet: fault point {name} reached: killing this process\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Names what the current task is doing, for points (like a commit) shared by many callers."""
    token = _scope.set(name)
    try:
        yield
    finally:
        _scope.reset(token)


def current_scope() -> str:
    return _scope.get()


def scoped_point(suffix: str) -> None:
    if _armed is not None and _scope.get():
        point(f"{_scope.get()}.{suffix}")
