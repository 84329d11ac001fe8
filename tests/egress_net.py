"""A network of the test's own for egress tests, with nothing on it that leads off this machine.

`EgressNet` makes an `--internal` engine network (no route out), runs one container on it (alias
`fakeapi`) that answers HTTP on ports 8000 and 8001 with `hello <port> <path>`, and serves two
things on the host that a run must never reach: one on 127.0.0.1 and one on the network's own
gateway address (the host's side of the bridge). Everything carries the test's label and is
removed by `close`."""

from __future__ import annotations

import http.server
import threading
import time
import uuid

import docker
from conftest import SANDBOX_IMAGE

SERVER = r"""
import http.server, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello {self.server.server_address[1]} {self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
servers = [S(("0.0.0.0", p), H) for p in (8000, 8001)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
"""


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"host secret"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((host, 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class EgressNet:
    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.test_id = f"egress-{uuid.uuid4().hex[:10]}"
        self.name = f"ratchet-test-{self.test_id}"
        self.labels = {"ratchet.test": self.test_id}
        self.network = client.networks.create(self.name, driver="bridge", internal=True, labels=self.labels)
        self.network.reload()
        self.gateway = self.network.attrs["IPAM"]["Config"][0]["Gateway"]
        self.server = client.containers.run(
            SANDBOX_IMAGE,
            ["python3", "-c", SERVER],
            detach=True,
            user="1000:1000",
            read_only=True,
            cap_drop=["ALL"],
            labels=self.labels,
            network=self.name,
        )
        # an alias: the proxy must resolve a name through the engine's DNS, like a real API host
        self.network.disconnect(self.server)
        self.network.connect(self.server, aliases=["fakeapi"])
        self._wait_ready()
        self.server.reload()
        self.server_ip = self.server.attrs["NetworkSettings"]["Networks"][self.name]["IPAddress"]
        self.loopback = _serve("127.0.0.1")  # a host service on loopback
        self.on_gateway = _serve(self.gateway)  # a host service on the bridge's host side

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while b"ready" not in self.server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"ready" in self.server.logs(), self.server.logs()

    @property
    def loopback_port(self) -> int:
        return self.loopback.server_address[1]

    @property
    def gateway_port(self) -> int:
        return self.on_gateway.server_address[1]

    def close(self) -> None:
        for server in (self.loopback, self.on_gateway):
            server.shutdown()
            server.server_close()
        self.server.remove(force=True)
        self.network.remove()


# A workload that reports, as one JSON line, what it could reach: through the proxy, and directly.
PROBE = r"""
import json, os, socket, sys, urllib.request, urllib.error
gw, gw_port, lo_port, server_ip = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {"interfaces": [n for _, n in socket.if_nameindex()], "proxy": os.environ.get("HTTPS_PROXY")}
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return f"{r.status} {r.read().decode()}"
    except urllib.error.HTTPError as e:
        return f"{e.code}"
    except Exception as e:
        return f"error {type(e).__name__}"
out["allowed"] = get("http://fakeapi:8000/v1/models")
out["other_port"] = get("http://fakeapi:8001/")
out["gateway_via_proxy"] = get(f"http://{gw}:{gw_port}/")
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(f"CONNECT {gw}:{gw_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
out["connect_gateway"] = s.recv(200).decode().split("\r\n")[0]
s.close()
direct = {}
for host, port in [(gw, gw_port), ("172.17.0.1", gw_port), (server_ip, 8000), ("169.254.169.254", 80),
                   ("127.0.0.1", lo_port), ("8.8.8.8", 53)]:
    c = socket.socket(); c.settimeout(3)
    try:
        c.connect((host, port)); direct[f"{host}:{port}"] = "CONNECTED"
    except OSError as e:
        direct[f"{host}:{port}"] = type(e).__name__
    c.close()
out["direct"] = direct
print(json.dumps(out))
"""
