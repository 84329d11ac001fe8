"""Hostile candidates against a real service, under each runtime (runc and gVisor's runsc).

Every attack is a candidate submitted over HTTP to a real loop on a real `ratchet serve`, and is
judged from its record. Per runtime, one service (three slots) runs three loops side by side:

  attacks    one candidate per attack, one after another (each a `train.py` that attacks)
  flood      one candidate printing 1 GiB, while the service's memory is watched
  bystander  well-behaved candidates, submitted back to back while the attacks run; each must end
             with exactly the result it computes

A watcher samples the service's /readyz, the containers of this service and the host's processes
throughout. Afterwards every attack has the status and reason it should, no bystander was
disturbed, /readyz never failed, and no container, volume or process of any attack is left.
Attacks that are refused before anything runs (patch attacks) have their own test below.
Hostile code only ever runs inside the sandbox; network attempts aim only at this machine's own
addresses (127.0.0.1 and the host's address on the engine's bridge).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import Server, settled_leftovers

pytestmark = pytest.mark.docker

ATTACKS_DIR = Path(__file__).parent / "attacks"
MiB = 1024 * 1024
LOG_BYTES = MiB  # RATCHET_LOG_BYTES of the service under attack
TIMEOUT_S = 6  # hard kill of the attack loop
KILL_SLACK_S = 1.0  # the whole tree must be gone this long after the deadline
TMP_MB = 256  # the sandbox's /tmp (sandbox.Limits.tmp_mb)

BASELINE = "print('---')\nprint('val_bpb: 1.000000')\n"
HARNESS = {"prepare.py": "SECRET = 'harness'\n", "lib/eval.py": "def evaluate():\n    return 1.0\n"}

FORK_BOMB = """
import errno, os
print("fork bomb", flush=True)
first = True
while True:
    try:
        os.fork()
    except OSError as e:
        if first:
            first = False
            os.write(1, ("fork refused: %s\\n" % errno.errorcode[e.errno]).encode())
"""

MEMORY_BOMB = """
hoard = []
while True:
    hoard.append(bytearray(16 << 20))
    print("holding", 16 * len(hoard), "MiB", flush=True)
"""

CPU_SPIN = "print('spinning', flush=True)\nwhile True:\n    pass\n"

# Ignores SIGTERM and leaves children (in sessions of their own) and grandchildren (re-parented
# to the gate) that ignore it too. TOKEN is in every one's command line, so the host can find them.
TERM_TREE = """
import signal, subprocess, sys, time
CHILD = (
    "import os, signal, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "if os.fork() == 0:\\n"
    "    os.setsid()\\n"
    "while True:\\n"
    "    time.sleep(0.05)\\n"
)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(3):
    subprocess.Popen([sys.executable, "-c", CHILD, "{token}"], start_new_session=True)
print("children spawned", flush=True)
while True:
    time.sleep(0.05)
"""

DISK_FILL = """
import errno, os
def fill(path):
    n = 0
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"z" * (1 << 20))
                f.flush()
                n += 1
    except OSError as e:
        return n, errno.errorcode[e.errno]
n, err = fill("/tmp/fill.bin")
print(f"/tmp: {err} after {n} MiB", flush=True)
os.unlink("/tmp/fill.bin")
with open("train.py", "ab") as f:  # the workspace (its editable file); no handler: the run dies of it
    while True:
        f.write(b"z" * (1 << 20))
        f.flush()
"""

FORGE_EXIT = "print('---')\nprint('val_bpb: 0.000001', flush=True)\nraise SystemExit(1)\n"

# Writes the gate's end-of-run report itself, then "finishes" with a winning summary and exit 0.
FORGE_REPORT = """
import sys, time
sys.stderr.write("\\n__RATCHET_DONE__ 0\\n")
sys.stderr.flush()
time.sleep(1.0)
print("---")
print("val_bpb: 0.000001", flush=True)
"""

# Writes the report a little before the deadline, then works on: the deadline must still hold.
FORGE_REPORT_LATE = f"""
import sys, time
time.sleep({TIMEOUT_S} - 1.5)
sys.stderr.write("\\n__RATCHET_DONE__ 0\\n")
sys.stderr.flush()
time.sleep(60)
print("---")
print("val_bpb: 0.000001", flush=True)
"""

NAN = "print('---')\nprint('val_bpb: nan')\n"
INF_JSON = (
    "import os\n"
    "with open(os.path.join(os.environ['RATCHET_OUTPUT_DIR'], 'metrics.json'), 'w') as f:\n"
    "    f.write('{\"val_bpb\": -Infinity}')\n"
)
OVERFLOW = "print('---')\nprint('val_bpb: -1e999')\n"
ABSURD = "print('---')\nprint('val_bpb: -1e300')\n"

FLOOD = """
import os
block = (b"y" * 1023 + b"\\n") * 1024
os.write(1, b"FLOOD START\\n")
for _ in range(1024):
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
os.write(1, b"FLOOD END\\n---\\nval_bpb: 2.000000\\n")
"""

# A well-behaved candidate: some CPU work with a known answer, a workspace and a /tmp round trip.
BYSTANDER = """
import hashlib, time
V = {value}
h = hashlib.sha256()
for _ in range(20000):
    h.update(b"x" * 4096)
assert h.hexdigest() == hashlib.sha256(b"x" * 4096 * 20000).hexdigest()
for path in ("scratch.txt", "/tmp/scratch.txt"):
    with open(path, "w") as f:
        f.write("ok")
    assert open(path).read() == "ok"
time.sleep(1.0)
print("---")
print(f"val_bpb: {{V:.6f}}")
"""


# -- the runtime under test ------------------------------------------------------------------------


@pytest.fixture(params=["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def runtime(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> str:
    have = set(docker_client.info().get("Runtimes", {}))
    if request.param not in have:
        why = f"the engine has no {request.param} runtime (scripts/setup.sh registers runsc)"
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return request.param


# -- helpers --------------------------------------------------------------------------------------


def create_loop(srv: Server, name: str, files: dict[str, str], **overrides: Any) -> dict:
    body = {
        "name": name,
        "workspace": {"files": files},
        "editable": ["train.py"],
        "time_budget_s": 3,
        "timeout_s": 30,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 128, "disk_mb": 32},
        **overrides,
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def submit(client: httpx.Client, loop_id: str, description: str, code: str) -> str:
    r = client.post(
        f"/v1/loops/{loop_id}/experiments", json={"description": description, "files": {"train.py": code}}
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def rss_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for pid {pid}")


def host_cmdlines() -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                raw = Path(entry.path, "cmdline").read_bytes()
                found.append(raw.replace(b"\0", b" ").decode("utf-8", "replace"))
    return found


def findings(srv: Server, exp_id: str) -> dict[str, Any]:
    text = srv.client.get(f"/v1/experiments/{exp_id}/logs").text
    for line in text.splitlines():
        if line.startswith("FINDINGS "):
            return json.loads(line[len("FINDINGS ") :])
    raise AssertionError(f"no findings in the log of {exp_id}:\n{text[-2000:]}")


def bridge_gateway(client: docker.DockerClient) -> str | None:
    """The host's own address on the engine's default bridge, if it has one (checked by binding it)."""
    try:
        gateway = client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
        with socket.socket() as s:
            s.bind((gateway, 0))  # succeeds only for an address of this host
        return gateway
    except (docker.errors.NotFound, KeyError, IndexError, OSError):
        return None


@dataclass
class Watcher:
    """Samples, every 0.2 s: /readyz, this service's containers (by experiment) and host processes."""

    srv: Server
    docker_client: docker.DockerClient
    token: str
    not_ready: list[str] = field(default_factory=list)
    containers: dict[str, set[str]] = field(default_factory=dict)  # experiment id -> container ids
    seen_procs: dict[str, int] = field(default_factory=dict)  # needle -> most host processes at once
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)

    def _run(self) -> None:
        client = httpx.Client(base_url=self.srv.url, timeout=10)
        label = f"ratchet.sandbox={self.srv.instance}"
        while not self._stop.is_set():
            try:
                r = client.get("/readyz")
                if r.status_code != 200:
                    self.not_ready.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.not_ready.append(repr(exc))
            try:
                listed = self.docker_client.api.containers(all=True, filters={"label": label})
            except docker.errors.DockerException as exc:
                self.not_ready.append(f"engine: {exc!r}")  # the engine is part of being ready
                listed = []
            for c in listed:
                exp = c["Labels"].get("ratchet.experiment", "?")
                self.containers.setdefault(exp, set()).add(c["Id"])
            cmdlines = host_cmdlines()
            for needle in [self.token, *(cid for ids in self.containers.values() for cid in ids)]:
                n = sum(needle in line for line in cmdlines)
                self.seen_procs[needle] = max(self.seen_procs.get(needle, 0), n)
            self._stop.wait(0.2)
        client.close()


@dataclass
class Bystander:
    """Keeps one or two well-behaved candidates of its own loop queued or running until stopped."""

    srv: Server
    loop_id: str
    submitted: list[tuple[str, float]] = field(default_factory=list)  # (experiment id, its value)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Bystander:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def wait_running(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.srv.client.get(f"/v1/loops/{self.loop_id}").json()["counts"]["running"] == 0:
            assert time.monotonic() < deadline, "the bystander loop never ran"
            time.sleep(0.1)

    def _run(self) -> None:
        client = httpx.Client(base_url=self.srv.url, timeout=30)
        while not self._stop.is_set():
            loop = client.get(f"/v1/loops/{self.loop_id}").json()
            if loop["counts"]["queued"] + loop["counts"]["running"] < 2:
                value = round(0.99 - 0.001 * len(self.submitted), 6)
                code = BYSTANDER.format(value=value)
                self.submitted.append((submit(client, self.loop_id, f"v={value}", code), value))
            self._stop.wait(0.2)
        client.close()


def overlaps(a: dict, b: dict) -> bool:
    """Bystander `b` was in the service (queued or running) while attack `a` ran: a sub-second
    attack can fall between two bystander runs on a loaded machine, never between two submissions."""
    return a["started_at"] < b["finished_at"] and b["created_at"] < a["finished_at"]


# -- the attacks ----------------------------------------------------------------------------------


@dataclass
class Attack:
    name: str
    code: str
    exp_id: str = ""


def in_container_attacks(token: str, net_config: dict, host_paths: list[str]) -> list[Attack]:
    network = f"CONFIG = {net_config!r}\n" + (ATTACKS_DIR / "network.py").read_text()
    escape = f"CONFIG = {{'host_paths': {host_paths!r}}}\n" + (ATTACKS_DIR / "escape.py").read_text()
    return [  # the first TIMED ones end at the hard deadline
        Attack("cpu_spin", CPU_SPIN),
        Attack("term_tree", TERM_TREE.format(token=token)),
        Attack("fork_bomb", FORK_BOMB),
        Attack("memory_bomb", MEMORY_BOMB),
        Attack("disk_fill", DISK_FILL),
        Attack("network", network),
        Attack("escape", escape),
        Attack("forge_exit", FORGE_EXIT),
        Attack("forge_report", FORGE_REPORT),
        Attack("forge_report_late", FORGE_REPORT_LATE),
        Attack("nan", NAN),
        Attack("inf_json", INF_JSON),
        Attack("overflow", OVERFLOW),
        Attack("absurd", ABSURD),
    ]


TIMED = 3
REFUSED = {"EACCES", "EPERM", "EROFS"}


def check_attack(
    attack: Attack, exp: dict, log: str, runtime: str, srv: Server, watcher: Watcher, net: dict
) -> list[str]:
    """What went wrong with one attack's outcome; empty when it was stopped and reported as it should."""
    status, reason = exp["status"], exp["reason"] or ""
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{what} (status {status}: {reason})")

    wall = exp["workload_seconds"]
    name = attack.name
    if name == "fork_bomb":
        if runtime == "runc":  # the pids limit answers EAGAIN; the bomb keeps trying until the kill
            expect(status == "timeout" and "hard timeout" in reason, "not killed at the deadline")
            expect("fork refused: EAGAIN" in log, "the pids limit never refused a fork")
        else:  # gVisor: EAGAIN inside too, but its kernel's own threads and memory for 128 processes
            # run out first; the sandbox dies of it, reported as such (see options.py)
            ended = "pids limit" in reason or "out of memory" in reason
            expect(status == "crash" and ended, "no crash naming the pids limit or memory")
        expect(subprocess.run(["true"], timeout=10).returncode == 0, "the host cannot fork")
    elif name == "memory_bomb":
        expect(status == "crash" and "out of memory" in reason, "not reported as out of memory")
        expect(exp["exit_code"] == 137, "not killed")
    elif name in ("cpu_spin", "term_tree"):
        expect(status == "timeout" and f"hard timeout of {TIMEOUT_S} s" in reason, "not a timeout")
        # workload_seconds ends when the engine reports the container stopped (PID 1 and with it
        # every process of the container gone), measured by the service, not by this test
        expect(wall is not None and 0 <= wall - TIMEOUT_S < KILL_SLACK_S, f"killed {wall} s after start")
        if name == "term_tree":
            ids = watcher.containers.get(exp["id"], set())
            expect(bool(ids), "its container was never seen")
            expect(all(watcher.seen_procs.get(cid, 0) > 0 for cid in ids), "its host processes never seen")
            if runtime == "runc":  # under gVisor they live in the sandbox's kernel, not the host's
                expect(watcher.seen_procs.get(watcher.token, 0) >= 6, "its process tree never seen")
    elif name == "disk_fill":
        expect(status == "crash" and reason == "exited with code 1", "not a crash of the workload")
        tmp = re.search(r"/tmp: ENOSPC after (\d+) MiB", log)
        expect(tmp is not None and int(tmp.group(1)) <= TMP_MB, "/tmp not bounded")
        tail = exp["log_tail"] or ""
        expect(
            "No space left on device" in tail, f"the record does not say the disk was full: {tail[-200:]!r}"
        )
    elif name == "network":
        expect(status == "discard", "the probe did not finish")
        problems += check_network(findings(srv, exp["id"]), net)
    elif name == "escape":
        expect(status == "discard", "the probe did not finish")
        problems += check_escape(findings(srv, exp["id"]), runtime, srv)
    elif name == "forge_exit":
        expect(status == "crash" and reason == "exited with code 1", "a non-zero exit was not a crash")
    elif name == "forge_report":
        expect(status == "crash" and "forged" in reason, "a forged end-of-run report was believed")
    elif name == "forge_report_late":
        expect(status == "timeout" and "hard timeout" in reason, "ran past the deadline on a forged report")
        # past the deadline: the end of the collection, 1 s for the gate to exit, then the kill
        expect(wall is not None and wall - TIMEOUT_S < 3.0, f"killed {wall} s after start")
    elif name == "nan":
        expect(status == "crash" and "val_bpb is nan" in reason, "NaN not refused")
    elif name in ("inf_json", "overflow"):
        expect(status == "crash" and "val_bpb is -inf" in reason, "-inf not refused")
    elif name == "absurd":
        expect(status == "crash" and "outside the loop's plausible range" in reason, "absurd value believed")
    expect(status != "keep", "KEPT")
    return problems


def check_network(seen: dict, net: dict) -> list[str]:
    problems = []
    if seen["proc_net_dev"] != ["lo"] or seen["if_nameindex"] != ["lo"]:
        problems.append(f"interfaces besides loopback: {seen['proc_net_dev']} {seen['if_nameindex']}")
    if seen["sys_class_net"] not in (["lo"], "ENOENT"):
        problems.append(f"/sys/class/net: {seen['sys_class_net']}")
    if seen["routes"] or not set(seen["ipv6_routes"]) <= {"lo"}:
        problems.append(f"routes: {seen['routes']} {seen['ipv6_routes']}")
    for host, port in net["targets"]:
        got = seen[f"tcp:{host}:{port}"]
        want = {"ECONNREFUSED"} if host == "127.0.0.1" else {"ENETUNREACH", "EHOSTUNREACH"}
        if got not in want:  # 127.0.0.1 inside is the container's own loopback
            problems.append(f"tcp to {host}:{port}: {got}")
    for host, port in net["udp"]:
        got = seen[f"udp:{host}:{port}"]
        if host != "127.0.0.1" and got == "OK":
            problems.append(f"udp to {host}:{port} was sent")
    for kind in ("raw_icmp", "raw_packet"):
        if seen[kind] not in {"EPERM", "EACCES", "EAFNOSUPPORT", "ESOCKTNOSUPPORT"}:
            problems.append(f"{kind} socket: {seen[kind]}")
    return problems


def check_escape(seen: dict, runtime: str, srv: Server) -> list[str]:
    problems = []

    def refused(key: str, allowed: set[str] = REFUSED) -> None:
        if seen[key] not in allowed:
            problems.append(f"{key}: {seen[key]}")

    for key in ("write_harness", "write_harness_subdir", "replace_harness", "write_root", "write_etc"):
        refused(key)
    refused("write_usr")
    for key in [k for k in seen if k.startswith(("engine_socket:", "host_path:"))]:
        refused(key, {"ENOENT"})
    refused("read_shadow", {"EACCES"})
    for key in ("proc_sys_write", "proc_sys_vm", "sysrq_trigger", "sys_write"):
        refused(key, REFUSED | {"ENOENT"})
    if seen["setuid_binary"] != [["1000"] * 4, ["1000"] * 4]:
        problems.append(f"a setuid binary ran with ids {seen['setuid_binary']}")
    for key in ("setuid_root", "chroot", "mount_tmpfs"):
        refused(key, {"EPERM"})
    if runtime == "runc":
        refused("mknod_disk", {"EPERM"})
    elif seen["mknod_disk"] == "OK":  # gVisor lets a node be made in its own tmpfs: it opens nothing
        refused("open_mknod_disk", {"ENXIO", "ENODEV", "EPERM", "EACCES"})
    refused("bpf", {"EPERM", "ENOSYS"})
    if seen["unshare_user_mount"] == "OK" and seen.get("mount_in_user_ns") == "OK":
        problems.append("mounted a file system in a new user namespace")
    if runtime == "runc":  # the engine's seccomp filter refuses new namespaces
        refused("unshare_user_mount", {"EPERM"})
    uids = {uid for _, uid in seen["processes"]}
    if uids != {1000} or len(seen["processes"]) > 10:
        problems.append(f"processes visible: {seen['processes']}")
    host_dirs = (
        str(srv.data_dir),
        str(Path(__file__).resolve().parent.parent),
        "/var/run/docker",
        "/run/docker",
    )
    if any(m.startswith(host_dirs) for m in seen["mounts"]):
        problems.append(f"host paths mounted: {seen['mounts']}")
    return problems


# -- the test -------------------------------------------------------------------------------------


def test_attacks_are_stopped_reported_and_leave_nothing(
    server_factory, docker_client: docker.DockerClient, runtime: str
) -> None:
    srv = server_factory(slots=3, env={"RATCHET_RUNTIME": runtime, "RATCHET_LOG_BYTES": str(LOG_BYTES)})
    token = f"ratchet-attack-{srv.instance}"
    attacks_loop = create_loop(
        srv,
        "attacks",
        {"train.py": BASELINE, **HARNESS},
        runtime=runtime,  # the loop's own setting; the other loops take the service's
        time_budget_s=TIMEOUT_S / 2,
        timeout_s=TIMEOUT_S,
        metric={"name": "val_bpb", "direction": "minimize", "min_value": 0, "max_value": 100},
        # /tmp (256 MB) and the workspace are memory-backed: memory is what fills them otherwise
        resources={"cpus": 0.5, "memory_mb": 384, "pids": 128, "disk_mb": 32},
    )
    bystander_loop = create_loop(srv, "bystander", {"train.py": BASELINE})
    flood_loop = create_loop(
        srv, "flood", {"train.py": BASELINE}, time_budget_s=150, timeout_s=300, resources={"cpus": 1.0}
    )
    loops = (attacks_loop, bystander_loop, flood_loop)
    assert {loop["config"]["runtime"] for loop in loops} == {runtime}
    for loop in loops:
        assert srv.wait_idle(loop["id"], timeout=120)["baseline"] == "ok"

    # the host's own listeners: nothing from inside may reach them
    gateway = bridge_gateway(docker_client)
    tcp_listener = socket.create_server(("0.0.0.0", 0))
    tcp_listener.setblocking(False)
    udp_listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_listener.bind(("0.0.0.0", 0))
    udp_listener.setblocking(False)
    tcp_port, udp_port = tcp_listener.getsockname()[1], udp_listener.getsockname()[1]
    hosts = ["127.0.0.1", *([gateway] if gateway else [])]
    net = {
        "targets": [[h, p] for h in hosts for p in (srv.port, tcp_port)],
        "udp": [[h, udp_port] for h in hosts],
    }
    host_paths = [str(srv.data_dir / "ratchet.db"), str(Path(__file__).resolve()), "/etc/docker/daemon.json"]
    attacks = in_container_attacks(token, net, host_paths)

    watcher = Watcher(srv, docker_client, token).start()
    bystander = Bystander(srv, bystander_loop["id"]).start()
    try:
        bystander.wait_running()
        for attack in attacks:
            attack.exp_id = submit(srv.client, attacks_loop["id"], attack.name, attack.code)
        # The flood starts once the attacks whose kill is timed are over: its load is not theirs.
        finals = {a.name: srv.wait_final(a.exp_id, timeout=300) for a in attacks[:TIMED]}
        rss_before = rss_kib(srv.proc.pid, "VmRSS")
        flood_id = submit(srv.client, flood_loop["id"], "1 GiB of output", FLOOD)
        finals |= {a.name: srv.wait_final(a.exp_id, timeout=300) for a in attacks[TIMED:]}
        flood = srv.wait_final(flood_id, timeout=300)
        hwm_after = rss_kib(srv.proc.pid, "VmHWM")
    finally:
        bystander.stop()
        for loop in loops:
            srv.wait_idle(loop["id"], timeout=120)
        watcher.stop()
        tcp_listener_got = _accepted(tcp_listener)
        udp_listener_got = _received(udp_listener)
        tcp_listener.close()
        udp_listener.close()

    # -- the bystander loop: every experiment judged on exactly what it computed, in finishing order
    problems: dict[str, list[str]] = {}
    bystanders = [srv.client.get(f"/v1/experiments/{eid}").json() for eid, _ in bystander.submitted]
    correct, best = [], 1.0
    for b, (_, value) in sorted(zip(bystanders, bystander.submitted, strict=True), key=_finish_order):
        if b["status"] == "cancelled":
            continue
        want = "keep" if value < best else "discard"
        if b["status"] == want and b["metric"] == value:
            correct.append(b)
        else:
            problems.setdefault("bystander", []).append(
                f"#{b['number']} {b['status']} {b['metric']}: {b['reason']}"
            )
        best = min(best, value) if want == "keep" else best
    assert len(correct) >= 3, f"the bystander loop hardly ran: {bystanders}"

    # -- every attack, one by one
    for attack in attacks:
        exp = finals[attack.name]
        log = srv.client.get(f"/v1/experiments/{attack.exp_id}/logs").text
        found = check_attack(attack, exp, log, runtime, srv, watcher, net)
        if not any(overlaps(exp, b) for b in correct):
            found.append("no bystander experiment was in the service (and ended correctly) while it ran")
        print(
            f"{runtime:5} {attack.name:12} {exp['status']:8} {exp['workload_seconds']!s:.5} {exp['reason']}"
        )
        if found:
            problems[attack.name] = found

    # -- 1 GiB of output: capped, marked, discarded on its own (valid) summary, service memory flat
    flood_log = srv.client.get(f"/v1/experiments/{flood_id}/logs").text
    dropped = re.findall(r"\n\[ratchet: (\d+) bytes of output dropped here\]\n", flood_log)
    print(f"{runtime:5} log_flood    {flood['status']:8} {flood['workload_seconds']!s:.5} {flood['reason']}")
    print(f"{runtime:5} service RSS before {rss_before} KiB, peak after {hwm_after} KiB")
    if not (
        flood["status"] == "discard"
        and len(dropped) == 1
        and int(dropped[0]) >= 1024 * MiB - LOG_BYTES
        and len(flood_log.encode()) <= LOG_BYTES + 100
        and flood_log.startswith("FLOOD START\n")
        and flood_log.endswith("FLOOD END\n---\nval_bpb: 2.000000\n")
    ):
        problems["log_flood"] = [
            f"{flood['status']}: {flood['reason']}; markers {dropped}; {len(flood_log)} bytes"
        ]
    if hwm_after - rss_before > 64 * 1024:
        problems.setdefault("log_flood", []).append(f"service RSS grew {rss_before} -> {hwm_after} KiB")

    # -- the service stayed healthy and nothing is left behind
    if watcher.not_ready:
        problems["service"] = [f"/readyz failed {len(watcher.not_ready)} times: {watcher.not_ready[:3]}"]
    assert srv.client.get("/readyz").status_code == 200
    if tcp_listener_got or udp_listener_got:
        problems.setdefault("network", []).append(
            f"the host's listeners got {tcp_listener_got} {udp_listener_got}"
        )
    left = settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")
    cmdlines = host_cmdlines()
    ids = {cid for exp_ids in watcher.containers.values() for cid in exp_ids}
    stray = [line for line in cmdlines if token in line or any(cid in line for cid in ids)]
    if left or stray:
        problems["leftovers"] = [*left, *stray]
    assert srv.proc is not None and srv.proc.poll() is None, "the service died"
    assert not problems, json.dumps(problems, indent=1)


def _finish_order(pair: tuple[dict, tuple[str, float]]) -> float:
    return pair[0]["finished_at"] or float("inf")


def _accepted(listener: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            conn, addr = listener.accept()
        except BlockingIOError:
            return got
        got.append(f"tcp from {addr}")
        conn.close()


def _received(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except BlockingIOError:
            return got
        got.append(f"udp {data[:20]!r} from {addr}")


# -- patch attacks: refused before anything is stored or run -------------------------------------

EDIT = (
    "--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n"
    " print('---')\n-print('val_bpb: 1.000000')\n+print('val_bpb: 0.500000')\n"
)
JSON = {"content-type": "application/json"}
HARNESS_HUNK = "@@ -1 +1 @@\n-SECRET = 'harness'\n+SECRET = 'mine'\n"

# name -> (body, expected status code, a phrase the message must hold). `test_api` covers the plain
# cases (absolute, `..` and `.git` paths in `files`, an empty patch, a symlink header, NUL bytes).
PATCH_ATTACKS: dict[str, tuple[dict, int, str]] = {
    "dotdot in a patch": (
        {"patch": f"--- a/../prepare.py\n+++ b/../prepare.py\n{HARNESS_HUNK}"},
        422,
        "'..'",
    ),
    "dotdot mid-path": (
        {"patch": f"--- a/src/../prepare.py\n+++ b/src/../prepare.py\n{HARNESS_HUNK}"},
        422,
        "'..'",
    ),
    "absolute path in a patch": (
        {"patch": "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-x\n+y\n"},
        422,
        "absolute",
    ),
    "absolute after the prefix": (
        {"patch": "--- a//etc/passwd\n+++ b//etc/passwd\n@@ -1 +1 @@\n-x\n+y\n"},
        422,
        "absolute",
    ),
    "symlink by index mode": (
        {
            "patch": "diff --git a/src/l b/src/l\nindex 0000000..e69de29 120000\n"
            "--- /dev/null\n+++ b/src/l\n@@ -0,0 +1 @@\n+/etc\n"
        },
        422,
        "symbolic links",
    ),
    "new file in .git": (
        {"patch": "--- /dev/null\n+++ b/.git/hooks/post-checkout\n@@ -0,0 +1 @@\n+#!/bin/sh\n"},
        422,
        ".git",
    ),
    ".GIT in an editable dir": (
        {"patch": "--- /dev/null\n+++ b/src/.GIT/config\n@@ -0,0 +1 @@\n+[core]\n"},
        422,
        ".git",
    ),
    "new non-editable file": (
        {"patch": "--- /dev/null\n+++ b/evil.py\n@@ -0,0 +1 @@\n+x = 1\n"},
        422,
        "read-only",
    ),
    "delete the harness": (
        {"patch": "--- a/prepare.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-SECRET = 'harness'\n"},
        422,
        "read-only",
    ),
    "harness edit hidden after a good one": (
        {"patch": EDIT + f"--- a/prepare.py\n+++ b/prepare.py\n{HARNESS_HUNK}"},
        422,
        "read-only",
    ),
    "rename onto the harness": (
        {
            "patch": "diff --git a/train.py b/prepare.py\nsimilarity index 100%\n"
            "rename from train.py\nrename to prepare.py\n"
        },
        422,
        "unsupported patch operation",
    ),
    "mode change": (
        {"patch": "diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n"},
        422,
        "unsupported",
    ),
    "CRLF patch on an LF file": ({"patch": EDIT.replace("\n", "\r\n")}, 422, "does not apply"),
    "CR in a file name": ({"files": {"train.py\r": "x"}}, 422, "use only letters"),
    "homoglyph file name": ({"files": {"tr\u0430in.py": "x"}}, 422, "use only letters"),
    "zero-width file name": ({"files": {"train.py\u200b": "x"}}, 422, "use only letters"),
    "lone surrogate": ({"files": {"train.py": "x = '\ud800'\n"}}, 400, "JSON is malformed"),
    "byte order mark before the patch": ({"patch": "\ufeff" + EDIT}, 422, "hunk before any"),
    "NUL in a patch": ({"patch": EDIT.replace("0.5", "0\x005")}, 422, "NUL"),
    "very long path": ({"files": {"a" * 5000 + ".py": "x"}}, 422, "read-only"),
    "whitespace-only patch": ({"patch": " \n\n\t\n"}, 422, "no '--- a/<file>'"),
    "headers without hunks": ({"patch": "--- a/train.py\n+++ b/train.py\n"}, 422, "no hunks"),
    "lying hunk counts": (
        {"patch": "--- a/train.py\n+++ b/train.py\n@@ -1,99999999 +1 @@\n print('---')\n"},
        422,
        "counts",
    ),
    "50 MB body": ({"files": {"train.py": "#" * (50 * MiB)}}, 413, "RATCHET_MAX_BODY_BYTES"),
}


def test_patch_attacks_are_refused_and_change_nothing(server_factory, runtime: str) -> None:
    """No container runs for these, but the loop's runtime stays the one under test."""
    srv = server_factory(slots=1, env={"RATCHET_RUNTIME": runtime})
    loop = create_loop(
        srv,
        "patches",
        {"train.py": BASELINE, "src/model.py": "W = 1\n", **HARNESS},
        editable=["train.py", "src/*"],
    )
    lid = loop["id"]
    srv.wait_idle(lid, timeout=120)

    def state() -> tuple:
        blobs = sorted(p.name for p in (srv.data_dir / "blobs").rglob("*"))
        view = srv.client.get(f"/v1/loops/{lid}").json()
        return (
            blobs,
            view["counts"],
            view["best_snapshot"],
            srv.client.get(f"/v1/loops/{lid}/experiments").json(),
            srv.client.get(f"/v1/loops/{lid}/snapshots").json(),
        )

    before = state()
    wrong = {}
    for name, (body, code, phrase) in PATCH_ATTACKS.items():
        # encoded by hand: \u escapes let a lone surrogate through, as any client could send it
        data = json.dumps({"description": name, **body}).encode()
        r = srv.client.post(f"/v1/loops/{lid}/experiments", content=data, headers=JSON)
        detail = (
            r.json().get("detail", "")
            if r.headers.get("content-type", "").startswith("application/json")
            else ""
        )
        if r.status_code != code or phrase not in detail:
            wrong[name] = f"{r.status_code}: {r.text[:300]}"
    raw = b'{"description": "raw bytes", "files": {"train.py": "\xff\xfe"}}'
    r = srv.client.post(
        f"/v1/loops/{lid}/experiments", content=raw, headers={"content-type": "application/json"}
    )
    if r.status_code != 400 or "not valid UTF-8" not in r.json().get("detail", ""):
        wrong["invalid UTF-8 in the body"] = f"{r.status_code}: {r.text[:300]}"
    assert not wrong, json.dumps(wrong, indent=1)
    assert state() == before, "a refused candidate changed something"
    assert srv.client.get("/readyz").status_code == 200
    # the same loop still takes a good candidate
    good = submit(srv.client, lid, "good", BASELINE.replace("1.000000", "0.500000"))
    assert srv.wait_final(good, timeout=120)["status"] == "keep"
