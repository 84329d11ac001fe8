"""The hardening of a container, as one pure function of the spec (testable without an engine)."""

from __future__ import annotations

from typing import Any

from .egress import proxy_env
from .gpus import GpuRoute, device_requests, gpu_env, strip_toolkit_env
from .spec import CACHE_DIR, HOME_DIR, Mount, RunSpec, home_dirs

__all__ = [
    "CACHE_DIR",
    "HOME_DIR",
    "INPUT_DIR",
    "MOUNT_POINT",
    "OUTPUT_DIR",
    "RUNSC_HOST_PIDS_PER_TASK",
    "WORKSPACE_DIR",
    "cache_volume_options",
    "container_options",
    "engine_mount",
    "run_env",
    "run_ids",
    "volume_options",
]

MOUNT_POINT = "/sandbox"
WORKSPACE_DIR = f"{MOUNT_POINT}/workspace"
OUTPUT_DIR = f"{MOUNT_POINT}/output"
INPUT_DIR = f"{MOUNT_POINT}/input"  # a spec's read-only `inputs`

# PID 1 of every container. It holds the untrusted workload back until a line arrives on stdin
# (so the container can be started and filled ahead of time), runs it with stdin closed, kills
# whatever the workload left behind, reports the exit code, and keeps the container (and so the
# per-run volume) alive until the runner says `collected`. PID 1 ignores signals from inside the
# container, so the workload cannot take the gate down with it. The engine keeps stdin open when
# the runner's connection goes, so a run outlives a restarted runner; the one that takes it over
# sends `go` again without knowing whether the first one arrived: once the workload has run, every
# line but `collected` is ignored.
GATE_SCRIPT = (
    "IFS= read -r _go || exit 125; "
    '"$@" </dev/null; code=$?; '
    "kill -9 -1 2>/dev/null; "
    'printf "\\n__RATCHET_DONE__ %s\\n" "$code" >&2; '
    'while IFS= read -r _line && [ "$_line" != collected ]; do :; done; '
    'exit "$code"'
)
DONE_MARKER = b"__RATCHET_DONE__"
# Under gVisor the host's pids limit counts the sandbox kernel's own threads: a handful of busy
# workload processes take over a hundred. The workload's own limit is then RLIMIT_NPROC, which
# gVisor enforces inside the sandbox (under runc it would count every uid-1000 process of the host).
RUNSC_HOST_PIDS_PER_TASK = 8


def volume_options(spec: RunSpec, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A tmpfs-backed volume: its size is the disk limit, and it vanishes with the run."""
    size = f"size={spec.limits.disk_mb}m,mode=0755,uid=0,gid=0"
    return {
        "name": name,
        "driver": "local",
        "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": size},
        "labels": labels,
    }


def run_ids(spec: RunSpec) -> tuple[int, int] | None:
    """The numeric uid and gid the run's user has (None for a user given by name)."""
    uid, _, gid = spec.user.partition(":")
    return (int(uid), int(gid or uid)) if uid.isdigit() and (gid or uid).isdigit() else None


def cache_volume_options(spec: RunSpec, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The run's cache directory: a tmpfs-backed volume of `cache_mb`, owned by the run's user and,
    unlike /tmp and the home, not `noexec` (compiled kernels are shared objects loaded from it)."""
    uid, gid = run_ids(spec) or (0, 0)
    size = f"size={spec.limits.cache_mb}m,mode=0755,uid={uid},gid={gid}"
    return {
        "name": name,
        "driver": "local",
        "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": size},
        "labels": labels,
    }


def _tmpfs(spec: RunSpec) -> dict[str, str]:
    """/tmp, and the home with the directories leading to mounts under it (see `home_dirs`)."""
    lim = spec.limits
    mounts = {"/tmp": f"size={lim.tmp_mb}m,mode=1777,nosuid,nodev"}
    ids = run_ids(spec)
    owner = f",uid={ids[0]},gid={ids[1]}" if ids else ""
    for d in home_dirs(spec.mounts):
        mode = "0700" if d == HOME_DIR else "0755"
        mounts[d] = f"size={lim.tmp_mb}m,mode={mode}{owner},nosuid,nodev"
    return mounts


def engine_mount(m: Mount) -> dict[str, Any]:
    """An extra mount in the engine's structured form: a missing host path is an error there (the
    short form would create it, empty), and a volume is never filled from the image (NoCopy)."""
    if m.is_bind:
        return {
            "Type": "bind",
            "Source": m.source,
            "Target": m.target,
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        }
    return {
        "Type": "volume",
        "Source": m.source,
        "Target": m.target,
        "ReadOnly": True,
        "VolumeOptions": {"NoCopy": True},
    }


def container_options(
    spec: RunSpec,
    volume: str,
    labels: dict[str, str],
    env: dict[str, str],
    gpu_route: GpuRoute = "none",
    cache_volume: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for docker-py's `containers.create`; every limit is set, nothing inherited.
    `gpu_route` is how this engine attaches GPUs (`sandbox.gpus`); a spec with GPUs on an engine
    without a route raises `GpuUnavailable`. `cache_volume` is mounted at CACHE_DIR."""
    lim = spec.limits
    pids_limit = lim.pids
    ulimits = [{"Name": "nofile", "Soft": lim.nofile, "Hard": lim.nofile}]
    if spec.runtime == "runsc":
        pids_limit = lim.pids * RUNSC_HOST_PIDS_PER_TASK
        ulimits.append({"Name": "nproc", "Soft": lim.pids, "Hard": lim.pids})
    opts: dict[str, Any] = {
        "image": spec.image,
        "entrypoint": ["/bin/sh", "-c", GATE_SCRIPT, "ratchet-gate"],
        "command": list(spec.argv),
        "environment": {**strip_toolkit_env(env), **gpu_env(gpu_route, spec.gpus)},
        "working_dir": WORKSPACE_DIR,
        "user": spec.user,
        "labels": labels,
        "hostname": "sandbox",
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "ipc_mode": "private",
        "pids_limit": pids_limit,
        "mem_limit": f"{lim.memory_mb}m",
        "memswap_limit": f"{lim.memory_mb}m",
        "nano_cpus": int(lim.cpus * 1e9),
        "ulimits": ulimits,
        "tmpfs": _tmpfs(spec),
        "shm_size": f"{min(lim.tmp_mb, 64)}m",
        "volumes": {volume: {"bind": MOUNT_POINT, "mode": "rw"}},
        "stdin_open": True,
        # The engine's own copy of the log is bounded too; the runner keeps its own capped copy.
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "1"}},
        "runtime": spec.runtime,
        "detach": True,
    }
    if cache_volume is not None:
        opts["volumes"][cache_volume] = {"bind": CACHE_DIR, "mode": "rw"}
    if spec.mounts:
        opts["mounts"] = [engine_mount(m) for m in spec.mounts]
    if spec.gpus:
        opts["device_requests"] = device_requests(gpu_route, spec.gpus)
    return opts


def run_env(spec: RunSpec, cache: bool) -> dict[str, str]:
    """The workload's environment: the spec's, and where its directories and network are."""
    env = {**spec.env, "RATCHET_OUTPUT_DIR": OUTPUT_DIR, "HOME": HOME_DIR}
    if spec.inputs:
        env["RATCHET_INPUT_DIR"] = INPUT_DIR
    if spec.egress is not None:
        env.update(proxy_env())
    if cache:
        env["RATCHET_CACHE_DIR"] = CACHE_DIR
    return env
