"""What a sandbox run takes and what it gives back.

These Structs are the whole public vocabulary of `sandbox`: a caller builds a `RunSpec`, the runner
returns a `RunResult`. Nothing here knows about loops or experiments.
"""

from __future__ import annotations

import posixpath
import re

import msgspec

__all__ = [
    "CACHE_DIR",
    "HOME_DIR",
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
_SAFE_TARGET = re.compile(r"^(/[A-Za-z0-9._+@=,-]+)+$")
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HOME_DIR = "/home/sandbox"  # HOME of every run: a private writable tmpfs, dataset mounts may sit inside
CACHE_DIR = "/sandbox/cache"  # a run's writable cache directory (its own volume), when it has one
# Mount targets never allowed at or under these: the run's volume, /tmp, the kernel's file systems.
_RESERVED = ("/sandbox", "/tmp", "/proc", "/dev", "/sys")
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
    cache_mb: int = 0  # size of the run's own cache volume at CACHE_DIR; 0: no cache directory


class FileEntry(msgspec.Struct, kw_only=True, frozen=True):
    """One workspace file. Read-only files belong to root and cannot be changed or removed."""

    path: str
    data: bytes
    writable: bool = False
    executable: bool = False


class Mount(msgspec.Struct, kw_only=True, frozen=True):
    """An extra mount, always read-only: a host path (absolute `source`) or a named volume, at
    `target`. A target may sit under the sandbox user's home; never over it, the run's volume
    (/sandbox: workspace, output, cache), /tmp, or another mount."""

    source: str
    target: str

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")


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
    # The cache directory's starting content: a tar whose members are placed under CACHE_DIR, owned
    # by the run's user (it is the run's private copy: what it writes there stays there).
    cache: bytes = b""
    collect_cache: bool = False  # return the cache directory as it is after the run (RunResult.cache)

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
        _validate_mounts(self.mounts)
        if (self.cache or self.collect_cache) and self.limits.cache_mb == 0:
            raise SpecError("a cache needs limits.cache_mb > 0 (the size of its volume)")
        if len(self.cache) > self.limits.cache_mb * 1024 * 1024:
            raise SpecError(f"the cache ({len(self.cache)} bytes) does not fit limits.cache_mb")
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
            "cache_mb": 0 <= lim.cache_mb <= 1024 * 1024,
        }
        for name, ok in checks.items():
            if not ok:
                raise SpecError(f"limit {name}={getattr(lim, name)} is out of range")


def mount_target(target: str) -> str:
    """The path the engine mounts at: normalised, with a leading "//" collapsed ("" if relative)."""
    return "/" + posixpath.normpath(target).lstrip("/") if target.startswith("/") else ""


def _validate_mounts(mounts: list[Mount]) -> None:
    seen: list[str] = []
    for m in mounts:
        target = mount_target(m.target)
        if target in ("", "/") or any(target == p or target.startswith(p + "/") for p in _RESERVED):
            raise SpecError(f"mount target {m.target!r} must be an absolute path of its own")
        if not _SAFE_TARGET.match(target):
            raise SpecError(
                f"mount target {m.target!r} may hold only letters, digits and ._+@=,- between slashes"
            )
        if target == HOME_DIR or HOME_DIR.startswith(target + "/"):
            raise SpecError(
                f"mount target {m.target!r} would hide the home {HOME_DIR}; mount under it instead"
            )
        if not (m.is_bind and mount_target(m.source) == m.source) and not (
            not m.is_bind and _VOLUME_NAME.match(m.source)
        ):
            raise SpecError(f"mount source {m.source!r} must be an absolute host path or a volume name")
        for other in seen:
            if target == other or target.startswith(other + "/") or other.startswith(target + "/"):
                raise SpecError(f"mount targets {other!r} and {target!r} overlap")
        seen.append(target)


def home_dirs(mounts: list[Mount]) -> list[str]:
    """The home and each directory between it and a mount target under it, parents first. Each
    gets a tmpfs of its own, owned by the run's user: the engine would otherwise create the
    missing ones as root's, and `~/.cache` beside a dataset at `~/.cache/NAME` would not be
    writable."""
    dirs = {HOME_DIR}
    for m in mounts:
        target = mount_target(m.target)
        if target.startswith(HOME_DIR + "/"):
            parts = target[len(HOME_DIR) + 1 :].split("/")[:-1]
            dirs.update(posixpath.join(HOME_DIR, *parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


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
    cache: bytes | None = None  # the cache directory after the run, as a tar (collect_cache only)
    cache_skipped: str = ""  # why it was not collected
    timings: Timings = msgspec.field(default_factory=Timings)

    @property
    def workload_seconds(self) -> float | None:
        t = self.timings
        if t.started is None or t.finished is None:
            return None
        return max(0.0, t.finished - t.started)
