"""A second Docker engine of the tests' own, with NVIDIA's container toolkit faked, so that GPU
requests go through a real engine on a machine without a GPU.

dockerd registers its `nvidia` device driver at start-up only when `nvidia-container-runtime-hook`
is on its PATH. This module starts a separate dockerd (own data root, exec root, pidfile, unix
socket, containerd namespaces and cgroup parent; no bridge, no iptables; the shared engine is
never touched) with a fake hook first on that PATH. The engine then accepts DeviceRequests, puts
NVIDIA_VISIBLE_DEVICES into each container's spec and runs the hook as an OCI prestart hook with
the container's state on stdin. The fake hook:

- records every call (container id, the spec's environment) as a JSON file (`hook_calls()`);
- does what the real toolkit visibly does for the workload: puts an `nvidia-smi` into the
  container listing exactly the devices of NVIDIA_VISIBLE_DEVICES, numbered from 0, with their
  host UUIDs (`GPU-fake-<host index>`), so `nvidia-smi -L` inside a sandbox tells which GPUs it got.

`host_bin` holds an `nvidia-smi` for the service's own detection (`gpus` fake GPUs); put it first
on the service's PATH together with DOCKER_HOST (`service_env()`). gVisor is registered as `runsc`
with `--nvproxy` in its runtimeArgs, the flag GPU runs need under gVisor; the gVisor release here
predates that flag, so a small wrapper drops it before running the real runsc.

Cost: the engine is ready in about half a second; loading the sandbox image (`docker save` from
the shared engine, `load` here) takes about 10 s. `start()`/`stop()` report both in `timings`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

__all__ = ["EngineEvent", "FakeGpuEngine", "HookCall", "fake_gpu_uuid"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def fake_gpu_uuid(host_index: str) -> str:
    return f"GPU-fake-{host_index}"


@dataclass(frozen=True)
class HookCall:
    """One run of the fake `nvidia-container-runtime-hook` for one container."""

    container_id: str
    time: float
    argv: list[str]
    env: list[str]  # the container spec's process env, in order (duplicates kept)

    def values(self, key: str) -> list[str]:
        return [e.split("=", 1)[1] for e in self.env if e.startswith(key + "=")]

    @property
    def visible(self) -> str | None:
        """NVIDIA_VISIBLE_DEVICES as NVIDIA's tooling reads it (the last one wins)."""
        found = self.values("NVIDIA_VISIBLE_DEVICES")
        return found[-1] if found else None


@dataclass(frozen=True)
class EngineEvent:
    container_id: str
    action: str
    time: float
    attributes: dict[str, str]


@dataclass
class FakeGpuEngine:
    gpus: int = 4
    image: str = "ratchet/sandbox:latest"
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = f"ratchet-fakegpu-{uuid.uuid4().hex[:8]}"
        # Short: containerd's sockets live under the exec root, and unix socket paths are short.
        self.base = Path(tempfile.mkdtemp(prefix="rfg-", dir="/tmp"))
        self.bin = self.base / "bin"  # first on dockerd's PATH
        self.host_bin = self.base / "host-bin"  # first on the service's PATH
        self.hook_dir = self.base / "hook"
        self.socket = self.base / "docker.sock"
        self.docker_host = f"unix://{self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._events: list[EngineEvent] = []
        self._events_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stream: Any = None
        self._client: docker.DockerClient | None = None

    # -- life ----------------------------------------------------------------------------------

    def start(self, source: docker.DockerClient) -> FakeGpuEngine:
        """Start the engine and load `image` into it from the engine `source` talks to."""
        for d in (self.bin, self.host_bin, self.hook_dir):
            d.mkdir(parents=True)
        self._write_tools()
        t0 = time.monotonic()
        self._start_dockerd()
        self.timings["engine_start_s"] = time.monotonic() - t0
        self._watch_events()
        t1 = time.monotonic()
        self.load(source, self.image)
        self.timings["image_load_s"] = time.monotonic() - t1
        return self

    def stop(self) -> None:
        """Stop the engine, then remove whatever it left: mounts, cgroups, files."""
        t0 = time.monotonic()
        if self._client is not None:
            with contextlib.suppress(Exception):
                for c in self._client.containers.list(all=True):
                    c.remove(force=True)
            self._client.close()
        if self._stream is not None:  # an open events stream holds dockerd's shutdown back
            with contextlib.suppress(Exception):
                self._stream.close()
        if self._proc is not None and self._proc.poll() is None:
            t1 = time.monotonic()
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self.timings["engine_stop_s"] = time.monotonic() - t1
        self._kill_managed_containerd()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._unmount_all()
        self._remove_cgroups()
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["stop_s"] = time.monotonic() - t0

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.docker_host, timeout=120)
        return self._client

    def service_env(self) -> dict[str, str]:
        """What a `ratchet serve` needs to use this engine and see the fake GPUs."""
        return {
            "DOCKER_HOST": self.docker_host,
            "PATH": f"{self.host_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def load(self, source: docker.DockerClient, image: str) -> None:
        """Copy `image` from the engine `source` talks to (another image a test needs, say)."""
        # Streamed: the image never sits in memory whole.
        chunks = source.api.get_image(image, chunk_size=1 << 20)
        for _ in self.client.api.load_image(chunks, quiet=True):
            pass
        self.client.images.get(image)  # raises if the load did not take

    def log(self) -> str:
        path = self.base / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- what happened -------------------------------------------------------------------------

    def hook_calls(self) -> list[HookCall]:
        calls = []
        for path in sorted(self.hook_dir.glob("*.json")):
            raw = json.loads(path.read_text())
            calls.append(HookCall(container_id=raw["id"], time=raw["time"], argv=raw["argv"], env=raw["env"]))
        return sorted(calls, key=lambda c: c.time)

    def events(self) -> list[EngineEvent]:
        """Container events seen since the engine started (create, start, die, destroy, ...)."""
        with self._events_lock:
            return list(self._events)

    def labels_of(self, container_id: str) -> dict[str, str]:
        """A container's labels (and image, name), from its create event: it may be gone by now."""
        for e in self.events():
            if e.container_id == container_id and e.action == "create":
                return e.attributes
        return {}

    # -- internals -----------------------------------------------------------------------------

    def _write_tools(self) -> None:
        hook = self.bin / "nvidia-container-runtime-hook"
        hook.write_text(_HOOK.replace("@PYTHON@", sys.executable).replace("@RECORDS@", str(self.hook_dir)))
        smi = self.host_bin / "nvidia-smi"
        smi.write_text(_HOST_SMI.format(python=sys.executable, gpus=self.gpus))
        wrapper = self.bin / "runsc-nvproxy"
        wrapper.write_text(_RUNSC_WRAPPER.format(runsc=shutil.which("runsc") or "/usr/bin/runsc"))
        for tool in (hook, smi, wrapper):
            tool.chmod(0o755)
        runtimes: dict[str, Any] = {}
        if shutil.which("runsc"):
            runtimes["runsc"] = {"path": str(wrapper), "runtimeArgs": ["--network=none", "--nvproxy"]}
        (self.base / "daemon.json").write_text(json.dumps({"runtimes": runtimes}))

    def _start_dockerd(self) -> None:
        env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("DOCKER_HOST", None)
        argv = [
            "dockerd",
            "--config-file", str(self.base / "daemon.json"),
            "--data-root", str(self.base / "data"),
            "--exec-root", str(self.base / "exec"),
            "--pidfile", str(self.base / "dockerd.pid"),
            "--host", self.docker_host,
            "--containerd-namespace", self.name,
            "--containerd-plugins-namespace", f"{self.name}-plugins",
            "--cgroup-parent", self.name,
            "--bridge", "none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--userland-proxy=false",
            "--log-level", "warn",
        ]  # fmt: skip
        log = open(self.base / "dockerd.log", "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the second dockerd exited at start:\n{self.log()[-3000:]}")
            with contextlib.suppress(Exception):
                if self.socket.exists() and self.client.ping():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the second dockerd did not answer in 60 s:\n{self.log()[-3000:]}")

    def _watch_events(self) -> None:
        stream_client = docker.DockerClient(base_url=self.docker_host, timeout=None)
        stream = self._stream = stream_client.events(decode=True, filters={"type": "container"})

        def follow() -> None:
            try:
                for raw in stream:
                    actor = raw.get("Actor") or {}
                    event = EngineEvent(
                        container_id=actor.get("ID", ""),
                        action=str(raw.get("Action") or raw.get("status") or ""),
                        time=raw.get("timeNano", 0) / 1e9,
                        attributes=dict(actor.get("Attributes") or {}),
                    )
                    with self._events_lock:
                        self._events.append(event)
            except Exception:  # the engine went away: the stream ends with it
                pass
            finally:
                stream_client.close()

        self._watcher = threading.Thread(target=follow, name=f"{self.name}-events", daemon=True)
        self._watcher.start()

    def _kill_managed_containerd(self) -> None:
        """dockerd stops its own containerd on a clean exit; after a kill, it is ours to stop."""
        pidfile = self.base / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.base).encode() in cmdline:  # only the containerd of this engine
                os.kill(pid, signal.SIGTERM)

    def _unmount_all(self) -> None:
        prefix = str(self.base) + "/"
        with contextlib.suppress(OSError):
            mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
            for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def _remove_cgroups(self) -> None:
        for top in CGROUP_ROOT.glob(f"*/{self.name}"):
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


# The fake `nvidia-container-runtime-hook`: runs on the host as the engine's prestart hook.
_HOOK = """\
#!@PYTHON@
\"\"\"Fake NVIDIA container toolkit hook: records the call, gives the container an nvidia-smi.\"\"\"
import json, os, sys, time

state = json.load(sys.stdin)
bundle = state["bundle"]
with open(os.path.join(bundle, "config.json")) as f:
    config = json.load(f)
env = config.get("process", {}).get("env", [])
record = {"id": state["id"], "time": time.time(), "argv": sys.argv, "env": env}
path = os.path.join("@RECORDS@", "%s-%d.json" % (state["id"], time.monotonic_ns()))
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(path + ".tmp", path)

# What the real hook does that a workload can see: the devices (here: an nvidia-smi naming them).
visible = [e.split("=", 1)[1] for e in env if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
ids = [] if not visible or visible[-1] in ("", "void", "none") else visible[-1].split(",")
if ids:
    root = config["root"]["path"]
    root = root if os.path.isabs(root) else os.path.join(bundle, root)
    listing = "".join("GPU %d: Fake GPU (UUID: GPU-fake-%s)\\n" % (n, g) for n, g in enumerate(ids))
    table = "".join("%d, GPU-fake-%s\\n" % (n, g) for n, g in enumerate(ids))
    script = (
        "#!/bin/sh\\n"
        "if [ \\"$1\\" = -L ]; then printf '" + listing + "'; else printf '" + table + "'; fi\\n"
    )
    smi = os.path.join(root, "usr", "bin", "nvidia-smi")
    with open(smi, "w") as f:
        f.write(script)
    os.chmod(smi, 0o755)
"""

# The host's `nvidia-smi`, as much of it as GPU detection and a doctor command read.
_HOST_SMI = textwrap.dedent(
    '''\
    #!{python}
    """Fake nvidia-smi: {gpus} GPUs."""
    import sys

    n = {gpus}
    args = sys.argv[1:]
    if "-L" in args:
        for i in range(n):
            print("GPU %d: Fake GPU (UUID: GPU-fake-%d)" % (i, i))
        sys.exit(0)
    query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
    if query is None:
        print("fake nvidia-smi: only -L and --query-gpu=... are known", file=sys.stderr)
        sys.exit(2)
    values = {{"index": str, "uuid": lambda i: "GPU-fake-%d" % i, "name": lambda i: "Fake GPU",
              "memory.total": lambda i: "81559 MiB"}}
    for i in range(n):
        print(", ".join(values[k.strip()](i) for k in query.split(",")))
    '''
)

# gVisor as registered for GPU runs (`--nvproxy`); this machine's gVisor predates the flag.
_RUNSC_WRAPPER = textwrap.dedent(
    """\
    #!/bin/sh
    # Drops --nvproxy (unknown to the gVisor release here; nothing to proxy with fake GPUs).
    for a in "$@"; do
      shift
      case "$a" in --nvproxy|--nvproxy=true) ;; *) set -- "$@" "$a" ;; esac
    done
    exec {runsc} "$@"
    """
)
