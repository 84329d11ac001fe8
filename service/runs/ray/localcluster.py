"""A real Ray cluster on this machine, on loopback only: a head and worker nodes, each a `ray start
--block` process group of its own, with Ray's token authentication on. For tests, benchmarks and
trying Ratchet's Ray executor without a cluster:

    with LocalCluster([Worker(name="w1", gpus=2), Worker(name="w2", gpus=2)]) as cluster:
        executor = RayExecutor(cluster.address, instance, token_file=cluster.token_path)

Every node, and every socket its processes hold, is checked to be on 127.0.0.1 (`verify`, run
by `start`): Ray left alone registers nodes under the machine's network address. GPUs are
logical (`--num-gpus`): on a machine without GPUs a worker's runs get its device ids all the same.
`kill(name)` takes a worker down at once (every process of it, SIGKILL), `restart(name)` brings
it back under the same name, as a new Ray node; `add(worker)` starts another one.

    python -m service.runs.ray.localcluster --workers 2 --gpus 2    # runs one until Ctrl-C
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from .inventory import NODE_LABEL

__all__ = ["ClusterError", "LocalCluster", "Worker", "off_loopback", "tcp_pids"]

LOOPBACK = "127.0.0.1"
_LOOPBACK_FORMS = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


class ClusterError(RuntimeError):
    pass


class Worker(msgspec.Struct, kw_only=True, frozen=True):
    name: str
    gpus: int = 0
    cpus: int = 1
    resources: dict[str, float] = {}
    docker_host: str | None = None  # the node's container engine (default: the machine's)


class _Process(msgspec.Struct, kw_only=True):
    name: str
    popen: Any
    log: str
    args: list[str]
    env: dict[str, str]
    tries: int = 1


class LocalCluster:
    def __init__(
        self,
        workers: list[Worker],
        *,
        head_cpus: int = 0,
        object_store_mb: int = 128,
        env: dict[str, str] | None = None,
        health_check_ms: int = 1000,
    ) -> None:
        self.workers = {w.name: w for w in workers}
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.extra_env = env or {}
        self.health_check_ms = health_check_ms
        self.dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths
        self.token_path = str(self.dir / "token")
        self.port = 0
        self._nodes: dict[str, _Process] = {}

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start and stop ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment of every process of this cluster, a driver's included."""
        ms = str(self.health_check_ms)
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_USAGE_STATS_ENABLED": "0",
            # A killed node is declared dead after about three periods, not Ray's default ~30 s.
            "RAY_health_check_initial_delay_ms": ms,
            "RAY_health_check_period_ms": ms,
            "RAY_health_check_timeout_ms": ms,
            "RAY_health_check_failure_threshold": "3",
            **self.extra_env,
        }

    def start(self, timeout: float = 120) -> LocalCluster:
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            self.port = _free_port()
            self._start_node(
                "head",
                [
                    "--head",
                    f"--port={self.port}",
                    f"--num-cpus={self.head_cpus}",
                    "--num-gpus=0",
                    "--include-dashboard=false",
                    f"--dashboard-port={_free_port()}",
                ],
            )
            self._wait_port(self.port, timeout)  # the GCS listens: workers may join (they retry)
            for worker in self.workers.values():
                self._start_worker(worker)
            self._wait_nodes(set(self._nodes), timeout)
            self.verify()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker(self, worker: Worker) -> None:
        args = [
            f"--address={self.address}",
            f"--num-cpus={worker.cpus}",
            f"--num-gpus={worker.gpus}",
            f"--labels={NODE_LABEL}={worker.name}",
        ]
        if worker.resources:
            args.append(f"--resources={json.dumps(worker.resources)}")
        env = {"DOCKER_HOST": worker.docker_host} if worker.docker_host else {}
        self._start_node(worker.name, args, env)

    def _start_node(
        self, name: str, args: list[str], env: dict[str, str] | None = None, tries: int = 1
    ) -> None:
        low, high = _free_range(40)
        ports = [
            f"--node-ip-address={LOOPBACK}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        log = str(self.dir / f"{name}.log")
        cmd = [
            sys.executable,
            "-m",
            "service.runs.ray.loopback",
            "start",
            "--block",
            *ports,
            *args,
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.dir / 'ray'}",
            "--include-log-monitor=false",
            "--disable-usage-stats",
        ]
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                cmd,
                env={**self.env(), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own session: every process of the node, found and killed
            )
        self._nodes[name] = _Process(name=name, popen=popen, log=log, args=args, env=env or {}, tries=tries)

    def stop(self) -> None:
        """Every process of every node, SIGTERM then (a second later) SIGKILL; the cluster's files.
        A test cluster keeps nothing worth a graceful stop, which takes Ray ten seconds."""
        for name in list(self._nodes):
            self._signal(name, signal.SIGTERM)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline and any(self._pids(n) for n in self._nodes):
            time.sleep(0.1)
        for name in list(self._nodes):
            self._signal(name, signal.SIGKILL)
            self._nodes[name].popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self._pids(n) for n in self._nodes):
            time.sleep(0.1)
        self._nodes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self, name: str) -> None:
        """Take a worker down at once: every process of it, as a machine that loses power."""
        if name not in self.workers:
            raise ClusterError(f"no worker named {name!r}")
        self._signal(name, signal.SIGKILL)
        self._nodes[name].popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self._pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        del self._nodes[name]

    def add(self, worker: Worker, timeout: float = 120) -> None:
        """A new worker node joins the running cluster."""
        if worker.name in self.workers:
            raise ClusterError(f"a worker named {worker.name} exists")
        self.workers[worker.name] = worker
        self._start_worker(worker)
        self._wait_nodes(set(self._nodes), timeout)
        self.verify()

    def restart(self, name: str, timeout: float = 120) -> None:
        """Bring a killed worker back under its name (Ray sees a new node)."""
        if name in self._nodes:
            raise ClusterError(f"worker {name} is running")
        self._start_worker(self.workers[name])
        self._wait_nodes(set(self._nodes), timeout)
        self.verify()

    def _signal(self, name: str, sig: int) -> None:
        for pid in self._pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _pids(self, name: str) -> list[int]:
        """Every process of node `name`: those of its session (Ray's workers stay in it)."""
        proc = self._nodes.get(name)
        if proc is None:
            return []
        return [pid for pid, sid in _sessions().items() if sid == proc.popen.pid]

    # -- checks ------------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as `ray.nodes()` lists them, asked of the GCS by a short-lived
        process of its own (no driver: that would wait for a raylet to attach to)."""
        code = (
            "import json; from ray._raylet import GcsClient; "
            "from ray.core.generated.gcs_pb2 import GcsNodeInfo; "
            f"infos = GcsClient(address={self.address!r}).get_all_node_info(timeout=20); "
            "print('nodes:', json.dumps([{'NodeID': i.node_id.hex(), "
            "'Alive': i.state == GcsNodeInfo.GcsNodeState.ALIVE, "
            "'NodeManagerAddress': i.node_manager_address, 'Resources': dict(i.resources_total), "
            "'Labels': dict(i.labels)} for i in infos.values()]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise ClusterError(f"cannot read the nodes of {self.address}: {out.stderr[-2000:]}")
        # Ray may print its own lines around ours
        line = next((x for x in out.stdout.splitlines() if x.startswith("nodes: ")), None)
        if line is None:
            raise ClusterError(f"no node list from {self.address}: {out.stdout[-2000:]}")
        return json.loads(line.removeprefix("nodes: "))

    def _wait_port(self, port: int, timeout: float) -> None:
        """Until something listens on loopback `port` (cheap: reading the nodes costs a driver)."""
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return
            head = self._nodes["head"]
            if head.popen.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the head's GCS is not up on port {port}:\n{_tail(head.log)}")
            time.sleep(0.2)

    def _wait_nodes(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in list(self._nodes.items()):
                if proc.popen.poll() is None:
                    continue
                # Ray gives a raylet 30 s to register, fixed: on a busy machine, try again.
                if proc.tries >= 3:
                    raise ClusterError(f"node {name} exited:\n{_tail(proc.log)}")
                self._signal(name, signal.SIGKILL)
                self._start_node(name, proc.args, proc.env, tries=proc.tries + 1)
            try:
                alive = [n for n in self.nodes() if n["Alive"]]
            except ClusterError:
                alive = []
            named = {(n["Labels"] or {}).get(NODE_LABEL) for n in alive}
            heads = sum(1 for n in alive if "node:__internal_head__" in n["Resources"])
            if heads == 1 and names - {"head"} <= named:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes {sorted(names)} not up after {timeout:g} s; alive: {alive}")
            time.sleep(0.5)

    def verify(self) -> None:
        """Fails loudly unless every node is registered at 127.0.0.1 and every TCP socket any of
        the cluster's processes holds is on loopback at both ends."""
        bad = [n for n in self.nodes() if n["Alive"] and n["NodeManagerAddress"] != LOOPBACK]
        if bad:
            raise ClusterError(f"Ray registered node(s) off loopback: {bad}")
        pids = {pid for name in self._nodes for pid in self._pids(name)}
        off = off_loopback(pids)
        if off:
            raise ClusterError(
                f"cluster processes hold sockets off loopback (pid, listening, local, peer): {off}"
            )


def off_loopback(pids: set[int]) -> list[tuple[int, bool, str, str]]:
    """TCP sockets of `pids` with an end off loopback: (pid, listening, local, peer)."""
    return [s for s in _sockets() if s[0] in pids and not (_loopback(s[2]) and (s[1] or _loopback(s[3])))]


def tcp_pids() -> set[int]:
    """Processes holding TCP sockets now."""
    return {s[0] for s in _sockets()}


def _loopback(address: str) -> bool:
    return address.rpartition(":")[0].strip("[]") in _LOOPBACK_FORMS


def _sockets() -> list[tuple[int, bool, str, str]]:
    """(pid, listening, local, peer) of every TCP socket on this machine, from `ss`."""
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 6 or "pid=" not in line:
            continue
        for chunk in line.split("pid=")[1:]:
            found.append((int(chunk.split(",")[0]), parts[0] == "LISTEN", parts[3], parts[4]))
    return found


def _sessions() -> dict[int, int]:
    """pid -> session id of every live process (a zombie holds nothing and cannot be killed)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z":
            found[int(entry)] = int(fields[3])
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _free_range(n: int) -> tuple[int, int]:
    """A block of `n` ports none of which is bound now, for a node's workers."""
    rng = secrets.SystemRandom()
    for _ in range(100):
        low = rng.randrange(20000, 30000 - n)
        try:
            for port in range(low, low + n):
                with socket.socket() as s:
                    s.bind((LOOPBACK, port))
        except OSError:
            continue
        return low, low + n - 1
    raise ClusterError(f"no block of {n} free ports")


def _tail(path: str, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=0, help="logical GPUs per worker")
    parser.add_argument("--cpus", type=int, default=1)
    opts = parser.parse_args()
    workers = [Worker(name=f"w{i + 1}", gpus=opts.gpus, cpus=opts.cpus) for i in range(opts.workers)]
    with LocalCluster(workers) as cluster:
        print(f"Ray cluster at {cluster.address}; token in {cluster.token_path}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
