"""Taking over the runs a previous process left alive (`Sandbox.reattach`).

What outlives the process that ran a container: the container itself (its gate holds it; the engine
keeps its stdin open, and with live-restore outlives its own restarts), the engine's copy of its
output (the json-file log driver, with a timestamp per piece) and the journal (`sandbox.journal`).
A run taken over is one of:

- prepared, never let go (no `opened_at`): attached afresh; `execute` opens its gate as for a run
  just prepared, and its deadline counts from then;
- let go: `go` is sent again (the gate ignores it if the first one arrived), the deadline is the
  original one (`opened_at` + its timeout), and the output is read back from the engine from the
  beginning, then followed: the engine's copy, read in two steps that overlap by a second and are
  deduplicated by timestamp, is the whole output once and in order. If that copy rotated (past its
  size cap, `options`), the journal's head comes first, then a line saying output is missing here,
  then what the engine still holds;
- past its deadline while nobody watched: killed, and a timeout, unless its gate reported the exit
  before the deadline (the engine's timestamps say when).

The gate lets go only once told `collected`, after the outputs are read: until then a run can be
taken over again, and it is collected by whoever gets there.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .engine import engine_call, remove_labelled
from .journal import RunRecord
from .logcap import CappedLog
from .runner import LABEL_RUN, LABEL_SANDBOX, PreparedRun, Sandbox, SandboxError
from .stream import FrameReader, OutputTap

__all__ = ["MISSING", "AdoptedRun", "reattach"]

log = logging.getLogger("ratchet.sandbox")

MISSING = b"\n[ratchet: output is missing here: the engine kept only its newest part while nobody read it]\n"
_OVERLAP_S = 1  # the follow step starts this long before the read-back ends (deduplicated)
_COMPARE_BYTES = 16 * 1024  # of each stream's head, to tell whether the engine's copy rotated
_HEADER = struct.Struct(">BxxxI")  # the attach stream's frame header: stream id, payload size

Piece = tuple[bytes, int, bytes]  # timestamp as the engine wrote it, stream, bytes


def reattach(sandbox: Sandbox) -> list[AdoptedRun]:
    """Takes over every live run of this instance with a journal record; removes everything else
    of this instance (exited containers, volumes of runs not taken over, the probe's leftovers)."""
    with engine_call("reattach"):
        found = sandbox.client.api.containers(
            all=True, filters={"label": f"{LABEL_SANDBOX}={sandbox.instance}"}
        )
    runs: list[AdoptedRun] = []
    for c in found:
        run_id = (c.get("Labels") or {}).get(LABEL_RUN)
        if sandbox.journal is None or not run_id or c.get("State") != "running":
            continue
        record = sandbox.journal.read(run_id)
        if record is None or record.container_id != c["Id"]:
            continue
        run = AdoptedRun(sandbox, record)
        try:
            run.attach()
        except SandboxError as exc:
            log.warning("run %s: cannot take it over (%s); it is removed", run_id, exc)
            continue
        runs.append(run)
    keep = frozenset({r.container_id or "" for r in runs} | {r.volume for r in runs})
    removed = remove_labelled(sandbox.client, {LABEL_SANDBOX: sandbox.instance}, keep)
    if sandbox.journal is not None:
        sandbox.journal.sweep({r.run_id for r in runs})
    if runs or removed:
        log.info("reattach: %d run(s) taken over, %d container(s)/volume(s) removed", len(runs), removed)
    return runs


class AdoptedRun(PreparedRun):
    """A run another process started, taken over from its journal record; `execute` it as usual."""

    def __init__(self, sandbox: Sandbox, record: RunRecord) -> None:
        super().__init__(sandbox, record.spec, record.gpu_route)  # type: ignore[arg-type]
        self.run_id, self.volume, self.container_id = record.run_id, record.volume, record.container_id
        self.opened_at = record.opened_at  # None: never let go
        self.timings.started = record.opened_at
        self._follower: _LogFollower | None = None

    def __repr__(self) -> str:
        return f"<AdoptedRun {self.run_id} container={self.container_id[:12] if self.container_id else ''}>"

    def attach(self) -> None:
        """To the gate's stdin; to the output too for a run never let go (as a prepare does): the
        output of one let go comes back through the engine's copy."""
        assert self.container_id is not None
        params = {"stdin": 1, "stream": 1}
        if self.opened_at is None:
            params |= {"stdout": 1, "stderr": 1}
        with engine_call("attach"):
            self._sock = self.sandbox.client.api.attach_socket(self.container_id, params=params)
            self._raw = getattr(self._sock, "_sock", self._sock)

    def _run_workload(
        self, frames: FrameReader, logbuf: CappedLog, tap: OutputTap | None
    ) -> tuple[str, float]:
        if self.opened_at is None:
            return super()._run_workload(frames, logbuf, tap)
        assert self._raw is not None and self.container_id is not None
        with engine_call("open gate"):
            self._raw.sendall(b"go\n")  # in case the first never arrived; the gate ignores it otherwise
        ends = self.opened_at + self.spec.timeout_s
        api = self.sandbox.client.api
        with engine_call("read the output back"):
            res = api._get(api._url("/containers/{0}/logs", self.container_id), params=_params(follow=False))
            api._raise_for_status(res)
        once = _Once()
        backlog = once.filter(_piece(s, p) for s, p in FrameReader().feed(res.content))
        outcome = self._replay(self._with_head(backlog), logbuf, tap, ends)
        self._follower = _LogFollower(api, self.container_id, _since(backlog), once)
        deadline = _monotonic_at(ends)
        if outcome is None:
            outcome = self._pump(frames, logbuf, deadline, until_marker=True, tap=tap)
        return outcome, deadline

    def _with_head(self, backlog: list[Piece]) -> list[Piece]:
        """The engine's copy as it is, when it still holds the beginning of each stream (the
        journal's head says what that was); else the head, a line saying so, and the copy."""
        head = self.sandbox.journal.head(self.run_id) if self.sandbox.journal is not None else []
        if all(_starts_with(backlog, head, stream) for stream in (1, 2)):
            return backlog
        log.warning("run %s: the engine's copy of the output rotated; the log marks the gap", self.run_id)
        return [(b"", s, p) for s, p in head] + [(b"", 1, MISSING)] + backlog

    def _replay(
        self, pieces: list[Piece], logbuf: CappedLog, tap: OutputTap | None, ends: float
    ) -> str | None:
        """Feeds what the run printed while nobody read it: "done" when the gate's report is among
        it, "timeout" when the workload ran past its deadline meanwhile, None while it goes on."""
        done = False
        try:
            for ts, stream, payload in pieces:
                when = _seconds(ts)
                if not done and when is not None and when > ends:
                    self._kill()
                    return "timeout"
                logbuf.write(payload)
                if tap is not None:
                    tap.feed(stream, payload)
                if stream == 2 and self._reports.feed(payload) and not done:
                    done, self._ended_at = True, when
        finally:
            if tap is not None:
                tap.emit()
        return "done" if done else None

    def _receive(self, timeout: float) -> bytes | None:
        if self._follower is None:
            return super()._receive(timeout)
        return self._follower.receive(timeout)

    def release(self) -> None:
        if self._follower is not None:
            self._follower.close()
        super().release()


class _Once:
    """Lets each piece of output through once. The engine reads its copy again from an earlier
    point when the file rotates under a follower, and the follow step starts before the read-back
    ended; but each stream's timestamps never go back (one copier per stream stamps its pieces in
    order), and the pieces of one read share a stamp. So per stream: a piece older than the newest
    let through is a repeat, and so are the first n at that newest stamp when n were let through."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, int, int]] = {}  # stream -> (stamp, let through, seen again)

    def filter(self, pieces: Iterable[Piece]) -> list[Piece]:
        return [p for p in pieces if self.new(p)]

    def new(self, piece: Piece) -> bool:
        stamp, stream = _nanos(piece[0]), piece[1]
        last, through, again = self._last.get(stream, (-1, 0, 0))
        if stamp > last:
            self._last[stream] = (stamp, 1, 1)
            return True
        if stamp < last:
            self._last[stream] = (last, through, 0)  # read again from further back
            return False
        again += 1
        fresh = again > through
        self._last[stream] = (last, through + fresh, again)
        return fresh


class _LogFollower:
    """The engine's copy of a run's output as it grows, from `since` on, read in a thread of its
    own; handed on in the attach stream's frames without the timestamps, each piece once."""

    def __init__(self, api: Any, container_id: str, since: str, once: _Once) -> None:
        self._once = once
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        with engine_call("follow the output"):
            # No read timeout: a workload may print nothing for longer than any timeout.
            self._response = api._get(
                api._url("/containers/{0}/logs", container_id),
                params=_params(follow=True, since=since),
                stream=True,
                timeout=None,
            )
            api._raise_for_status(self._response)
        threading.Thread(target=self._read, name=f"follow-{container_id[:12]}", daemon=True).start()

    def _read(self) -> None:
        frames = FrameReader()
        try:
            for chunk in self._response.raw.stream(65536, decode_content=False):
                out = bytearray()
                for stream, payload in frames.feed(chunk):
                    piece = _piece(stream, payload)
                    if self._once.new(piece):
                        data = piece[2]
                        out += _HEADER.pack(stream, len(data)) + data
                if out:
                    self._queue.put(bytes(out))
        except Exception as exc:  # the connection closed under us (release), or the engine went away
            log.debug("log follower: %s", exc)
        finally:
            self._queue.put(b"")

    def receive(self, timeout: float) -> bytes | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._response.close()


def _params(follow: bool, since: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow)}
    if since is not None:
        params["since"] = since
    return params


def _piece(stream: int, payload: bytes) -> Piece:
    ts, _, data = payload.partition(b" ")
    return ts, stream, data


def _nanos(ts: bytes) -> int:
    """The engine's timestamp (RFC 3339 in UTC, nanoseconds: 2026-12-01T15:54:06.086415645Z) as
    Unix nanoseconds, exactly."""
    whole, _, frac = ts.decode().rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return seconds * 1_000_000_000 + int(frac.ljust(9, "0")[:9] or 0)


def _seconds(ts: bytes) -> float | None:
    return _nanos(ts) / 1e9 if ts else None


def _since(backlog: list[Piece]) -> str:
    """Where the follow step starts (the engine's `since`: seconds.nanoseconds): a little before
    the read-back's newest piece, since pieces of stdout and stderr can reach the file slightly out
    of time order. What it reads again is left out by `_Once`."""
    if not backlog:
        return "0"
    start = max(_nanos(p[0]) for p in backlog) - _OVERLAP_S * 1_000_000_000
    return f"{start // 1_000_000_000}.{start % 1_000_000_000:09d}"


def _starts_with(backlog: list[Piece], head: list[tuple[int, bytes]], stream: int) -> bool:
    """Whether the engine's copy of `stream` begins as the journal's head of it does. The engine
    writes invalid UTF-8 as U+FFFD, one per byte: compared as text without replacement characters."""
    mine = b"".join(p for s, p in head if s == stream)[:_COMPARE_BYTES]
    if not mine:
        return True
    theirs = b"".join(p for _, s, p in backlog if s == stream)[: 4 * _COMPARE_BYTES]
    return _text(theirs).startswith(_text(mine))


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\ufffd", "")


def _monotonic_at(wall: float) -> float:
    return time.monotonic() + (wall - time.time())
