"""What a run leaves on disk so that another process can take it over: its record (container,
volume, spec, when its gate was asked to open) and the head of its output as it arrived.

A container outlives the process that runs it (the gate holds it, the engine keeps stdin open), but
nothing else of that process survives a `kill -9`. The journal is written with plain writes, never
fsynced: it only has to outlive the process, not the machine, since a machine that goes down takes
its containers with it and there is nothing left to take over. The record is replaced whole (a new
file renamed over the old), so a reader sees the old record or the new one, never half of either.

The head is the start of the output (stream id and bytes of each piece, as the engine's attach
stream framed it), up to half the log cap: the part of a capped log the engine's own copy of the
output loses first when it rotates. See `adopt`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from pathlib import Path

import msgspec

from .spec import RunSpec

__all__ = ["HeadWriter", "Journal", "RunRecord"]

log = logging.getLogger("ratchet.sandbox")

_HEADER = struct.Struct(">BxxxI")  # the engine's frame header: stream id, payload size


class RunRecord(msgspec.Struct, kw_only=True):
    run_id: str
    container_id: str
    volume: str
    cache_volume: str | None = None  # the run's cache directory, when it has one
    spec: RunSpec  # without its files, inputs and cache seed: they are in the container already
    gpu_route: str = "none"
    # The gate was asked to open at this instant (written just before): the hard deadline is this
    # plus spec.timeout_s. None: the workload was never let go.
    opened_at: float | None = None


class Journal:
    """One directory of run records (`<run id>.json`) and output heads (`<run id>.head`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, record: RunRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{record.run_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        os.replace(tmp, path)

    def record(self, record: RunRecord, head_limit: int) -> HeadWriter | None:
        """Writes `record`; once its gate opens, returns the writer of its output's head. A failing
        disk is logged: the run goes on, a restart just cannot take it over."""
        try:
            self.write(record)
        except OSError as exc:
            log.warning("run %s: journal not written (%s): a restart cannot take it over", record.run_id, exc)
            return None
        if record.opened_at is None:
            return None
        return HeadWriter(self.directory / f"{record.run_id}.head", head_limit)

    def read(self, run_id: str) -> RunRecord | None:
        try:
            return msgspec.json.decode((self.directory / f"{run_id}.json").read_bytes(), type=RunRecord)
        except (OSError, msgspec.DecodeError) as exc:
            log.info("run %s: no usable journal record (%s)", run_id, exc)
            return None

    def head(self, run_id: str) -> list[tuple[int, bytes]]:
        """The output's head as (stream, bytes) pieces; a piece cut off by a kill is left out."""
        try:
            data = (self.directory / f"{run_id}.head").read_bytes()
        except OSError:
            return []
        pieces, at = [], 0
        while at + _HEADER.size <= len(data):
            stream, size = _HEADER.unpack_from(data, at)
            end = at + _HEADER.size + size
            if end > len(data):
                break
            pieces.append((stream, data[at + _HEADER.size : end]))
            at = end
        return pieces

    def remove(self, run_id: str) -> None:
        for suffix in (".json", ".json.tmp", ".head"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{run_id}{suffix}").unlink()

    def sweep(self, keep: set[str]) -> int:
        """Removes the files of every run not in `keep`; returns how many runs that was."""
        if not self.directory.is_dir():
            return 0
        gone = {p.name.split(".", 1)[0] for p in self.directory.iterdir()} - keep
        for run_id in gone:
            self.remove(run_id)
        return len(gone)


class HeadWriter:
    """Appends the first `limit` bytes of a run's output to its head file, piece by piece. Only
    the run's own thread writes; a failing disk costs the head, never the run."""

    def __init__(self, path: Path, limit: int) -> None:
        self._path = path
        self._left = limit
        self._fd: int | None = None

    def feed(self, stream: int, payload: bytes) -> None:
        if self._left <= 0 or not payload:
            return
        payload = payload[: self._left]
        self._left -= len(payload)
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, _HEADER.pack(stream, len(payload)) + payload)
        except OSError as exc:
            log.warning("journal %s: %s; the head of this run's output is not kept", self._path, exc)
            self._left = 0
        if self._left <= 0:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
