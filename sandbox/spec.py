"""What a sandbox run takes and what it gives back.

These Structs are the whole public vocabulary of `sandbox`: a caller builds a `RunSpec`, the runner
returns a `RunResult`. Nothing here knows about loops or experiments.
"""

from __future__ import annotations

import posixpath
import re

import msgspec

__all__ = [
    "Egress",
    "FileEntry",
    "Limits",
    "Mount",
    "RunDetached",
    "RunResult",
    "RunSpec",
    "SpecError",
    "Timings",
]

_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+@=,-]+(/[A-Za-z0-9._+@=,-]+)*$")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# host:port for an egress allow-list: a DNS name, an IPv4 address or a bracketed IPv6 address
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?):([0-9]{1,5})$")
_NETWORK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RUNTIMES = ("runc", "runsc")
RUNSC_MIN_PIDS = 128  # gVisor's own sandbox threads count against the pids limit


class RunDetached(Exception):
    """`execute` let go of a run that goes on (see `PreparedRun.detach`)."""


class SpecError(ValueError):
    """The spec is unusable; raised before the engine is touched."""


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    """Resource limits of one container. Every field has a safe default."""

    cpus: float = 1.0  # CPU quota in cores
    memory_mb: int = 1024  # hard memory limit; swap is never added on top
    pids: int = 256  # processes + threads; stops fork bombs
    nofile: int = 1024  # open file descriptors
    disk_mb: int = 512  # size of the per-run volume holding workspace + output
    tmp_mb: int = 256  # size of the tmpfs at /tmp
    log_bytes: int = 4 * 1024 * 1024  # log kept; the rest is dropped with a marker
    output_bytes: int = 16 * 1024 * 1024  # files collected from the output directory


class FileEntry(msgspec.Struct, kw_only=True, frozen=True):
    """One workspace file. Read-only files belong to root and cannot be changed or removed."""

    path: str
    data: bytes
    writable: bool = False
    executable: bool = False


class Mount(msgspec.Struct, kw_only=True, frozen=True):
    """An extra mount, always read-only: a named volume or a host path, at `target`."""

    source: str
    target: str


class Egress(msgspec.Struct, kw_only=True, frozen=True):
    """Network for a run, through an allow-listing proxy and nothing else.

    The run's container keeps no network interface but loopback. A relay in its network namespace
    (a container of its own) listens on 127.0.0.1:`PROXY_PORT` and passes each connection over a
    Unix socket to a proxy container on `network`, which connects only to the `allow`ed endpoints
    (exact `host:port`, HTTP CONNECT or plain-HTTP requests). Both run `image` (it needs python3),
    hardened like the run, and go with it."""

    allow: list[str]  # "host:port", compared exactly (host case-insensitively)
    network: str = "bridge"  # the engine network the proxy reaches the endpoints through
    image: str = "ratchet/sandbox:latest"


class RunSpec(msgspec.Struct, kw_only=True, frozen=True):
    image: str
    argv: list[str]
    files: list[FileEntry] = []
    # Read-only files beside the workspace, in $RATCHET_INPUT_DIR (their `writable` is ignored).
    inputs: list[FileEntry] = []
    # Workspace paths (files or directories; "." is all of it) whose content after the run comes
    # back in `RunResult.workspace_files`.
    collect: list[str] = []
    egress: Egress | None = None  # None: no network at all
    env: dict[str, str] = {}
    mounts: list[Mount] = []
    limits: Limits = Limits()
    gpus: list[str] = []  # host device ids; empty means no GPU at all
    runtime: str = "runc"
    timeout_s: float = 600.0  # hard wall-clock kill, counted from the workload's start
    labels: dict[str, str] = {}
    user: str = "1000:1000"

    def validate(self) -> RunSpec:
        """Refuse a spec that cannot run safely; returns self so calls chain."""
        if not self.image:
            raise SpecError("image must not be empty")
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise SpecError("argv must be a non-empty list of non-empty strings")
        if self.runtime not in RUNTIMES:
            raise SpecError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if not 0 < self.timeout_s <= 7 * 24 * 3600:
            raise SpecError("timeout_s must be positive and at most a week")
        if self.runtime == "runsc" and self.limits.pids < RUNSC_MIN_PIDS:
            raise SpecError(
                f"pids={self.limits.pids} is too low for runsc: its own threads count against the"
                f" limit; use at least {RUNSC_MIN_PIDS}"
            )
        if self.user.split(":")[0] in ("0", "root", ""):
            raise SpecError("the sandbox never runs as root")
        self._validate_limits()
        _check_paths(self.files, "workspace")
        _check_paths(self.inputs, "input")
        for path in self.collect:
            if path != "." and not _safe(path):
                raise SpecError(f"unsafe path to collect {path!r}")
        if self.egress is not None:
            _check_egress(self.egress, self.runtime)
        for m in self.mounts:
            # normpath keeps a leading "//"; collapse it so "//sandbox" is seen as "/sandbox"
            target = "/" + posixpath.normpath(m.target).lstrip("/") if m.target.startswith("/") else ""
            if target in ("", "/") or any(
                target == p or target.startswith(p + "/") for p in ("/sandbox", "/tmp")
            ):
                raise SpecError(f"mount target {m.target!r} must be an absolute path of its own")
        for key in self.labels:
            if not _LABEL_KEY.match(key):
                raise SpecError(f"label key {key!r} must be lowercase letters, digits, '.', '_', '-'")
        return self

    def _validate_limits(self) -> None:
        lim = self.limits
        checks = {
            "cpus": 0.01 <= lim.cpus <= 1024,
            "memory_mb": 16 <= lim.memory_mb <= 4 * 1024 * 1024,
            "pids": 8 <= lim.pids <= 1_000_000,
            "nofile": 16 <= lim.nofile <= 1_048_576,
            "disk_mb": 1 <= lim.disk_mb <= 1024 * 1024,
            "tmp_mb": 1 <= lim.tmp_mb <= 1024 * 1024,
            "log_bytes": 1024 <= lim.log_bytes <= 1024**3,
            "output_bytes": 0 <= lim.output_bytes <= 1024**3,
        }
        for name, ok in checks.items():
            if not ok:
                raise SpecError(f"limit {name}={getattr(lim, name)} is out of range")


def _safe(path: str) -> bool:
    return bool(_SAFE_PATH.match(path)) and not any(p in (".", "..") for p in path.split("/"))


def _check_paths(files: list[FileEntry], what: str) -> None:
    seen: set[str] = set()
    for f in files:
        if not _safe(f.path):
            raise SpecError(f"unsafe {what} path {f.path!r}")
        if f.path in seen:
            raise SpecError(f"duplicate {what} path {f.path!r}")
        seen.add(f.path)


def _check_egress(egress: Egress, runtime: str) -> None:
    if runtime != "runc":
        # The engine registers runsc with --network=none: its containers have gVisor's own
        # loopback only, which the relay (in the host's view of the namespace) never reaches.
        raise SpecError("egress needs the runc runtime (runsc is registered with --network=none)")
    if not egress.allow:
        raise SpecError("egress.allow is empty: give host:port endpoints, or no egress at all")
    for endpoint in egress.allow:
        m = _ENDPOINT.match(endpoint)
        if m is None or not 0 < int(m.group(3)) < 65536:
            raise SpecError(f"egress endpoint {endpoint!r} is not host:port")
    if not _NETWORK.match(egress.network) or egress.network in ("host", "none"):
        raise SpecError(f"egress network {egress.network!r} must be a named engine network")


class Timings(msgspec.Struct, kw_only=True):
    """Wall-clock instants (Unix seconds) of one run; None where the run never got there."""

    created: float | None = None  # container created
    ready: float | None = None  # workspace copied in, gate waiting
    started: float | None = None  # gate opened: the untrusted workload begins
    finished: float | None = None  # workload exited (or was killed)
    released: float | None = None  # container gone, result complete


class RunResult(msgspec.Struct, kw_only=True):
    exit_code: int | None  # None when the engine reported none (e.g. never started)
    oom_killed: bool = False
    timed_out: bool = False
    cancelled: bool = False
    # The gate reported the workload's exit status. False with none of the flags above: the
    # container died around its PID 1 (e.g. gVisor's sandbox reaching the pids limit).
    exit_reported: bool = False
    # More than one exit report arrived: the workload wrote one itself (see stream.Reports).
    report_forged: bool = False
    timeout_s: float = 0.0  # the hard timeout the run was held to (its spec's)
    log: str = ""
    log_bytes: int = 0  # bytes the workload wrote, kept or not
    log_truncated: bool = False
    output_files: dict[str, bytes] = {}
    output_skipped: list[str] = []  # output files left out: too large, not regular, over the cap
    workspace_files: dict[str, bytes] = {}  # the spec's `collect` paths after the run
    workspace_skipped: list[str] = []  # collected paths left out: links, devices, over the cap
    egress_log: str = ""  # the proxy's decisions, one line per connection (runs with egress)
    peak_memory_bytes: int | None = None
    timings: Timings = msgspec.field(default_factory=Timings)

    @property
    def workload_seconds(self) -> float | None:
        t = self.timings
        if t.started is None or t.finished is None:
            return None
        return max(0.0, t.finished - t.started)
