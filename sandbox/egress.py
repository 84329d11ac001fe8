"""Network for one run through an allow-list, and nothing else (`RunSpec.egress`).

The run's own container keeps `network_mode=none`: its only interface is loopback, so no address
of the host, its bridges or anything beyond has a route from it. Two small containers of trusted
code make the one door:

    run container (lo only) ── 127.0.0.1:3128 ── relay ──unix socket── proxy ── network ── endpoint
                            (the relay shares the run's network namespace; the socket lives on a
                             tmpfs volume only the relay and the proxy mount)

The relay forwards every TCP connection made to 127.0.0.1:`PROXY_PORT` inside the run's namespace
to the proxy's Unix socket. The proxy sits on the engine network `Egress.network`, reads one HTTP
request head and connects only when its `host:port` is exactly on the allow-list: `CONNECT host:port`
(HTTPS and any other TCP) or a plain-HTTP request in absolute form; anything else is answered 403
and logged. The workload finds the proxy in `HTTP_PROXY`/`HTTPS_PROXY`.

Both helpers run as nobody (uid 65534), read-only, without capabilities, with small limits, and carry
the run's labels, so removing the run (or a restarted service's cleanup by label) removes them. They
need `python3` in `Egress.image`. Under runsc (registered with `--network=none`) the run's loopback
is gVisor's own and the relay cannot reach it, so egress needs runc (`RunSpec.validate` says so).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .engine import SandboxError, engine_call
from .spec import Egress

__all__ = ["PROXY_PORT", "PROXY_URL", "helper_options", "proxy_env", "socket_volume_options"]

log = logging.getLogger("ratchet.sandbox")

PROXY_PORT = 3128
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
SOCKET_DIR = "/egress"
SOCKET = f"{SOCKET_DIR}/proxy.sock"
NOBODY = "65534:65534"
READY_TIMEOUT_S = 20.0
LOG_BYTES = 64 * 1024

# Both programs copy bytes one way per thread, and close both ends when either side does.
_PIPE = r"""def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
"""

# The proxy: one thread per connection; the allow-list is its argv. Each decision is one log line.
PROXY_SCRIPT = r"""
import os, socket, sys, threading
path, allow = sys.argv[1], {a.lower() for a in sys.argv[2:]}
""" + _PIPE + r"""def split(hostport, default):
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else default
    else:
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", default)
    return host.lower(), port
def answer(conn, code, text):
    conn.sendall(f"HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{text}\n".encode())
def handle(conn):
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = (lines[0].split(" ") + ["", "", ""])[:3]
        if method == "CONNECT":
            host, port = split(target, "")
        elif target.startswith("http://"):
            hostport, _, tail = target[7:].partition("/")
            host, port = split(hostport, "80")
            lines[0] = f"{method} /{tail} {version}"
            lines = [l for l in lines if not l.lower().startswith("proxy-")]
        else:
            print(f"deny {method} {target[:200]!r}: not a proxy request", flush=True)
            why = "ratchet egress: send CONNECT host:port or an absolute http:// URL"
            return answer(conn, "400 Bad Request", why)
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if endpoint not in allow:
            print(f"deny {method} {endpoint}", flush=True)
            why = f"ratchet egress: {endpoint} is not on this run's allow-list"
            return answer(conn, "403 Forbidden", why)
        try:
            up = socket.create_connection((host, int(port)), timeout=15)
        except (OSError, ValueError) as exc:
            print(f"fail {method} {endpoint}: {exc}", flush=True)
            return answer(conn, "502 Bad Gateway", f"ratchet egress: cannot reach {endpoint}: {exc}")
        up.settimeout(None)
        print(f"allow {method} {endpoint}", flush=True)
        if method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + rest)
        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join()
    except OSError:
        pass
    finally:
        conn.close()
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(64)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""

# The relay: 127.0.0.1:PORT in the run's network namespace -> the proxy's Unix socket.
RELAY_SCRIPT = r"""
import socket, sys, threading
port, path = int(sys.argv[1]), sys.argv[2]
""" + _PIPE + r"""def handle(conn):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
    except OSError:
        conn.close()
        return
    threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
    pipe(conn, up)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(64)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def proxy_env() -> dict[str, str]:
    """What tells the workload's HTTP clients where the door is."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
    return {**dict.fromkeys(names, PROXY_URL), "NO_PROXY": "", "no_proxy": "", "RATCHET_PROXY": PROXY_URL}


def socket_volume_options(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A tiny tmpfs volume for the socket, owned by nobody: the run's container never mounts it."""
    return {
        "name": name,
        "driver": "local",
        "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": "size=1m,mode=0700,uid=65534,gid=65534"},
        "labels": labels,
    }


def helper_options(
    role: str, egress: Egress, volume: str, labels: dict[str, str], network_mode: str
) -> dict[str, Any]:
    """docker-py `containers.create` arguments of the proxy (`role="proxy"`, on the egress network)
    or the relay (`role="relay"`, in the run's network namespace)."""
    if role == "proxy":
        argv = ["python3", "-c", PROXY_SCRIPT, SOCKET, *egress.allow]
    else:
        argv = ["python3", "-c", RELAY_SCRIPT, str(PROXY_PORT), SOCKET]
    return {
        "image": egress.image,
        "command": argv,
        "entrypoint": [],
        "user": NOBODY,
        "labels": {**labels, "ratchet.egress": role},
        "network_mode": network_mode,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": 128,
        "mem_limit": "128m",
        "memswap_limit": "128m",
        "nano_cpus": int(0.5e9),
        "ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024}],
        "tmpfs": {"/tmp": "size=8m,mode=1777,nosuid,nodev"},
        "volumes": {volume: {"bind": SOCKET_DIR, "mode": "rw"}},
        "working_dir": "/",
        "log_config": {"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
        "runtime": "runc",
        "detach": True,
    }


class EgressDoor:
    """The relay and the proxy of one run: `open` once the run's container is started (its network
    namespace exists), `log` for the proxy's decisions, `close` on every path (never raises)."""

    def __init__(self, client: Any, egress: Egress, run_id: str, labels: dict[str, str]) -> None:
        self.client = client
        self.egress = egress
        self.run_id = run_id
        self.labels = labels
        self.volume = f"ratchet-egress-{run_id}"
        self.containers: dict[str, str] = {}  # role -> container id

    def open(self, run_container: str) -> None:
        """Raises SandboxError when the engine fails or a helper does not come up (what was made
        is still removed by `close`)."""
        with engine_call("open egress"):
            self.client.volumes.create(**socket_volume_options(self.volume, self.labels))
            modes = {"proxy": self.egress.network, "relay": f"container:{run_container}"}
            for role in ("proxy", "relay"):  # the proxy's socket first: the relay connects per connection
                opts = helper_options(role, self.egress, self.volume, self.labels, modes[role])
                container = self.client.containers.create(**opts)
                self.containers[role] = container.id
                container.start()
                self._wait_ready(role, container)

    def _wait_ready(self, role: str, container: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if b"ready" in container.logs(stdout=True, stderr=False):
                return
            container.reload()
            if container.status not in ("created", "running"):
                break
            time.sleep(0.05)
        text = container.logs(tail=20).decode("utf-8", errors="replace").strip()
        why = f"the {role} did not start ({container.status}): {text or 'no output'}"
        raise SandboxError(f"open egress: {why}")

    def log(self) -> str:
        """The proxy's decisions (allow / deny / fail, one line per connection), capped."""
        proxy = self.containers.get("proxy")
        if proxy is None:
            return ""
        try:
            data = self.client.api.logs(proxy, stdout=True, stderr=True)
        except Exception as exc:  # a missing log never fails the run
            return f"(egress log unavailable: {exc})\n"
        text = data.decode("utf-8", errors="replace").replace("ready\n", "", 1)
        return text[-LOG_BYTES:]

    def close(self) -> None:
        for role, cid in self.containers.items():
            try:
                self.client.api.remove_container(cid, force=True)
            except Exception as exc:
                log.debug("run %s: remove egress %s: %s", self.run_id, role, exc)
        for _ in range(20):  # the volume stays "in use" while a removal finishes
            try:
                self.client.api.remove_volume(self.volume, force=True)
                return
            except Exception as exc:
                if "in use" not in str(exc):
                    log.debug("run %s: remove egress volume: %s", self.run_id, exc)
                    return
                time.sleep(0.1)
