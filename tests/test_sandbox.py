"""The sandbox against the real container engine: one test per property, each proving one limit bites.

Every test runs under its own `Sandbox(instance=...)` and carries its own `ratchet.test` label; the
`sbx` fixture checks after each test that no container and no volume of that instance is left.
Workloads are small `python3 -c` / `sh -c` programs that report what they saw as one JSON line.
Tests parametrized with `runtime` also run under gVisor (`runsc`) when the engine has it.
"""

from __future__ import annotations

import json
import os
import re
import select as _select
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from conftest import SANDBOX_IMAGE, leftovers

import sandbox.runner as sandbox_runner
from sandbox import (
    LABEL_SANDBOX,
    OUTPUT_DIR,
    WORKSPACE_DIR,
    FileEntry,
    Limits,
    Mount,
    PreparedRun,
    RunResult,
    RunSpec,
    Sandbox,
    SandboxError,
    SpecError,
)

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


# -- fixtures and helpers ------------------------------------------------------------------------


@dataclass
class Sbx:
    """One test's sandbox: its own instance name and label, so its leftovers are its own."""

    sandbox: Sandbox
    instance: str
    test_id: str
    runtime: str = "runc"

    def spec(self, argv: list[str], **kw: Any) -> RunSpec:
        kw.setdefault("runtime", self.runtime)
        kw.setdefault("image", SANDBOX_IMAGE)
        kw["labels"] = {"ratchet.test": self.test_id, **kw.get("labels", {})}
        return RunSpec(argv=argv, **kw)

    def run(self, argv: list[str], **kw: Any) -> RunResult:
        return self.sandbox.run(self.spec(argv, **kw))

    def py(self, code: str, **kw: Any) -> RunResult:
        return self.run(["python3", "-c", code], **kw)


@pytest.fixture(scope="session")
def engine_runtimes(docker_client: docker.DockerClient) -> set[str]:
    return set(docker_client.info().get("Runtimes", {}))


@pytest.fixture(params=["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def runtime(request: pytest.FixtureRequest, engine_runtimes: set[str]) -> str:
    if request.param not in engine_runtimes:
        pytest.skip(f"the engine has no {request.param} runtime (has: {', '.join(sorted(engine_runtimes))})")
    return request.param


@pytest.fixture
def sbx(docker_client: docker.DockerClient) -> Iterator[Sbx]:
    instance = f"test-sbx-{uuid.uuid4().hex[:12]}"
    box = Sbx(Sandbox(client=docker_client, instance=instance), instance, uuid.uuid4().hex)
    yield box
    left = leftovers(docker_client, f"{LABEL_SANDBOX}={instance}")
    if left:  # never leave a failing test's containers running on the machine
        box.sandbox.remove_labelled({LABEL_SANDBOX: instance})
    assert not left, f"left behind by {instance}: {left}"


@pytest.fixture
def rsbx(sbx: Sbx, runtime: str) -> Sbx:
    """`sbx` under each available runtime."""
    sbx.runtime = runtime
    return sbx


def report(result: RunResult) -> dict[str, Any]:
    """The workload's JSON report: the last line of its log starting with '{'."""
    for line in reversed(result.log.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON report in the log (exit {result.exit_code}):\n{result.log[-2000:]}")


# Workload-side helper: run a few file operations, record errno names ("OK" on success).
PROBE = r"""
import errno, json, os, sys
out = {}
def t(name, fn):
    try:
        fn()
        out[name] = "OK"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
"""


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


# -- 1. a plain run ------------------------------------------------------------------------------


def test_run_reports_exit_code_log_env_cwd_and_timings(rsbx: Sbx) -> None:
    code = r"""
import json, os, sys, time
time.sleep(0.3)
print(json.dumps({"cwd": os.getcwd(), "foo": os.environ.get("FOO"), "home": os.environ.get("HOME"),
                  "out": os.environ.get("RATCHET_OUTPUT_DIR"), "argv": sys.argv[1:]}), flush=True)
sys.exit(3)
"""
    result = rsbx.run(["python3", "-c", code, "a b", "c"], env={"FOO": "bar baz"})

    assert result.exit_code == 3
    assert not (result.oom_killed or result.timed_out or result.cancelled or result.log_truncated)
    assert report(result) == {
        "cwd": WORKSPACE_DIR,
        "foo": "bar baz",
        "home": "/home/sandbox",
        "out": OUTPUT_DIR,
        "argv": ["a b", "c"],
    }
    assert result.log_bytes == len(result.log.encode())
    assert "__RATCHET_DONE__" not in result.log
    t = result.timings
    assert None not in (t.created, t.ready, t.started, t.finished, t.released)
    assert t.created <= t.ready <= t.started <= t.finished <= t.released
    assert t.released - t.created < 20
    assert result.workload_seconds is not None
    assert 0.3 <= result.workload_seconds < 0.3 + 2.0


def test_output_files_come_back(rsbx: Sbx) -> None:
    code = r"""
import json, os
d = os.environ["RATCHET_OUTPUT_DIR"]
with open(os.path.join(d, "metrics.json"), "w") as f:
    json.dump({"val_bpb": 0.9979}, f)
os.mkdir(os.path.join(d, "sub"))
with open(os.path.join(d, "sub", "inner.bin"), "wb") as f:
    f.write(bytes(range(256)))
os.symlink("/etc/passwd", os.path.join(d, "link"))
print("{}", flush=True)
"""
    result = rsbx.py(code)

    assert result.exit_code == 0, result.log
    assert result.output_files == {
        "metrics.json": b'{"val_bpb": 0.9979}',
        "sub/inner.bin": bytes(range(256)),
    }
    assert result.output_skipped == ["link"]  # a link is listed, never followed


def test_output_file_over_the_cap_is_skipped(sbx: Sbx) -> None:
    code = r"""
import os
d = os.environ["RATCHET_OUTPUT_DIR"]
open(os.path.join(d, "a_small.txt"), "w").write("small")
open(os.path.join(d, "big.bin"), "wb").write(b"x" * (1024 * 1024))
"""
    result = sbx.py(code, limits=Limits(output_bytes=64 * 1024))

    assert result.exit_code == 0, result.log
    assert result.output_files == {"a_small.txt": b"small"}
    assert "big.bin" in result.output_skipped


def test_output_files_after_an_oversized_one_still_come_back(sbx: Sbx) -> None:
    # The engine's archive lists files in name order; a skipped big file must not take the
    # small files after it down with it.
    code = r"""
import os
d = os.environ["RATCHET_OUTPUT_DIR"]
open(os.path.join(d, "a_small.txt"), "w").write("a")
open(os.path.join(d, "big.bin"), "wb").write(b"x" * (1024 * 1024))
open(os.path.join(d, "z_metrics.json"), "w").write('{"val_bpb": 1.0}')
"""
    result = sbx.py(code, limits=Limits(output_bytes=64 * 1024))

    assert result.exit_code == 0, result.log
    assert result.output_files == {"a_small.txt": b"a", "z_metrics.json": b'{"val_bpb": 1.0}'}
    assert result.output_skipped == ["big.bin"]


class _SlowSelect:
    """Stands in for the `select` module inside the runner: every wait first sleeps `delay`
    (a busy host) and lasts at least `min_wait` (the runner sits in select longer)."""

    def __init__(self, delay: float = 0.0, min_wait: float = 0.0) -> None:
        self.delay, self.min_wait = delay, min_wait

    def select(self, r: list, w: list, x: list, timeout: float | None = None) -> tuple:
        time.sleep(self.delay)
        return _select.select(r, w, x, max(timeout or 0.0, self.min_wait))


def test_log_keeps_a_large_write(rsbx: Sbx) -> None:
    # One large write (a long report and the summary block), then the workload idles a moment
    # so that everything is delivered well before it exits. (Under gVisor a write to the
    # container's stdout pipe can return short, and unbuffered Python drops the rest.)
    tail = "\n---\nval_bpb: 1.000000\n"
    code = f"import sys, time\nsys.stdout.write('x' * 1000000 + {tail!r})\n"
    code += "sys.stdout.flush()\ntime.sleep(0.5)\n"
    result = rsbx.py(code)

    assert result.exit_code == 0, result.log[-500:]
    assert result.log_bytes == 1000000 + len(tail)
    assert result.log.endswith(tail)


def test_log_keeps_output_written_just_before_exit(sbx: Sbx, monkeypatch: pytest.MonkeyPatch) -> None:
    # The workload's last stdout bytes may still be in the engine's pipes when the gate reports
    # on stderr; a runner that reads slowly (a busy host) must still get all of them.
    monkeypatch.setattr(sandbox_runner, "select", _SlowSelect(delay=0.03))
    tail = "\n---\nval_bpb: 1.000000\n"
    code = f"import sys\nsys.stdout.write('x' * 2000000 + {tail!r})\n"
    for attempt in range(3):
        result = sbx.py(code)
        assert result.exit_code == 0, result.log[-500:]
        assert result.log_bytes == 2000000 + len(tail), f"attempt {attempt}: stdout tail lost"
        assert result.log.endswith(tail), f"attempt {attempt}: summary block lost"


# -- 2. no network -------------------------------------------------------------------------------


def test_no_network_only_loopback(rsbx: Sbx) -> None:
    host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host.bind(("127.0.0.1", 0))
    host.listen(8)
    host.setblocking(False)
    port = host.getsockname()[1]
    code = (
        PROBE
        + rf"""
import socket
dev = open("/proc/net/dev").read().splitlines()[2:]
out["interfaces"] = sorted(line.split(":")[0].strip() for line in dev)
out["if_nameindex"] = sorted(name for _, name in socket.if_nameindex())
out["netns"] = os.readlink("/proc/self/ns/net")
out["routes"] = [l for l in open("/proc/net/route").read().splitlines()[1:] if l.strip()]
try:
    v6 = open("/proc/net/ipv6_route").read().split()
    out["ipv6_route_ifaces"] = sorted(set(v6[9::10]))
except OSError:
    out["ipv6_route_ifaces"] = []
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("127.0.0.1", {port}))
t("connect_host_port", connect)
print(json.dumps(out), flush=True)
"""
    )
    try:
        result = rsbx.py(code)
        with pytest.raises(BlockingIOError):
            host.accept()  # nothing from the container reached the host's listener
    finally:
        host.close()

    assert result.exit_code == 0, result.log
    seen = report(result)
    assert seen["netns"] != os.readlink("/proc/self/ns/net")  # not the host's network namespace
    assert seen["interfaces"] == ["lo"]
    assert seen["if_nameindex"] == ["lo"]
    assert seen["routes"] == []  # no default route, no route at all
    assert set(seen["ipv6_route_ifaces"]) <= {"lo"}
    # Inside, 127.0.0.1 is the container's own loopback: the host's listener is not there.
    assert seen["connect_host_port"] == "ECONNREFUSED"


# -- 3. read-only root, unprivileged -------------------------------------------------------------


def test_read_only_root_non_root_no_capabilities_no_new_privileges(rsbx: Sbx) -> None:
    code = (
        PROBE
        + r"""
import ctypes
for path in ("/etc/x", "/usr/x", "/var/tmp/x", "/x"):
    t(path, lambda p=path: open(p, "w").close())
out["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())]
out["status"] = open("/proc/self/status").read()
root = [l.split() for l in open("/proc/self/mounts") if l.split()[1] == "/"]
out["root_opts"] = root[-1][3].split(",")
out["prctl_no_new_privs"] = ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
print(json.dumps(out), flush=True)
"""
    )
    result = rsbx.py(code)

    assert result.exit_code == 0, result.log
    seen = report(result)
    # /var/tmp is world-writable and "/" is root's: only the read-only mount stops these.
    assert seen["/var/tmp/x"] == "EROFS"
    assert "ro" in seen["root_opts"]
    if rsbx.runtime == "runc":
        assert seen["/etc/x"] == seen["/usr/x"] == seen["/x"] == "EROFS"
    else:  # gVisor checks permissions before the read-only flag
        assert {seen["/etc/x"], seen["/usr/x"], seen["/x"]} <= {"EROFS", "EACCES"}
    assert seen["ids"] == [1000, 1000, 1000, 1000, [1000]]
    status = _status(seen["status"])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if cap in status or rsbx.runtime == "runc":
            assert status[cap] == "0000000000000000", cap
    assert seen["prctl_no_new_privs"] == 1
    if rsbx.runtime == "runc":
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # the engine's default seccomp filter is on


# -- 4. harness files are read-only ---------------------------------------------------------------


def test_harness_files_cannot_be_changed(rsbx: Sbx) -> None:
    """Read-only files belong to root, and every directory holding one is root's and not writable:
    no write, chmod, unlink, rename, or replacement by renaming another file or directory over it."""
    files = [
        FileEntry(path="prepare.py", data=b"HARNESS"),
        FileEntry(path="lib/eval.py", data=b"EVAL"),
        FileEntry(path="train.py", data=b"TRAIN", writable=True),
        FileEntry(path="notes/todo.md", data=b"TODO", writable=True),
    ]
    code = (
        PROBE
        + r"""
t("write", lambda: open("prepare.py", "a").write("x"))
t("truncate", lambda: os.truncate("prepare.py", 0))
t("chmod", lambda: os.chmod("prepare.py", 0o666))
t("chown", lambda: os.chown("prepare.py", 1000, 1000))
t("unlink", lambda: os.unlink("prepare.py"))
t("rename_away", lambda: os.rename("prepare.py", "notes/moved.py"))
t("create_in_free_dir", lambda: open("notes/fake.py", "w").write("FAKE"))
t("rename_over", lambda: os.rename("notes/fake.py", "prepare.py"))
t("rename_over_in_subdir", lambda: os.rename("notes/fake.py", "lib/eval.py"))
t("link_over", lambda: os.link("notes/fake.py", "lib/evil.py"))
t("unlink_in_subdir", lambda: os.unlink("lib/eval.py"))
t("rename_subdir", lambda: os.rename("lib", "notes/lib2"))
t("mkdir_in_free_dir", lambda: os.mkdir("notes/fakelib"))
t("rename_dir_over", lambda: os.rename("notes/fakelib", "lib"))
t("create_next_to_harness", lambda: open("new.py", "w").write("NEW"))
t("write_writable", lambda: open("train.py", "a").write("+"))
for key, path in (("prepare", "prepare.py"), ("eval", "lib/eval.py"), ("train", "train.py")):
    try:
        st = os.stat(path)
        out[key] = [open(path).read(), oct(st.st_mode & 0o7777), st.st_uid]
    except OSError as e:
        out[key] = errno.errorcode[e.errno]
out["names"] = sorted(os.listdir("."))
out["lib"] = sorted(os.listdir("lib"))
print(json.dumps(out), flush=True)
"""
    )
    result = rsbx.py(code, files=files)

    assert result.exit_code == 0, result.log
    seen = report(result)
    refused = {"EACCES", "EPERM"}
    for attempt in (
        "write",
        "truncate",
        "chmod",
        "chown",
        "unlink",
        "rename_away",
        "rename_over",
        "rename_over_in_subdir",
        "link_over",
        "unlink_in_subdir",
        "rename_subdir",
        "rename_dir_over",
        "create_next_to_harness",
    ):
        assert seen[attempt] in refused, (attempt, seen[attempt])
    assert seen["create_in_free_dir"] == "OK" and seen["mkdir_in_free_dir"] == "OK"
    assert seen["write_writable"] == "OK"
    assert seen["prepare"] == ["HARNESS", "0o444", 0]
    assert seen["eval"] == ["EVAL", "0o444", 0]
    assert seen["train"] == ["TRAIN+", "0o644", 1000]
    assert seen["names"] == ["lib", "notes", "prepare.py", "train.py"]
    assert seen["lib"] == ["eval.py"]


# -- 5. processes ---------------------------------------------------------------------------------


def _host_can_fork() -> bool:
    return subprocess.run(["true"], timeout=10).returncode == 0


def test_pids_limit_stops_process_flood(sbx: Sbx) -> None:
    # Forks until the engine refuses (bounded at 2000 tries so that a broken limit cannot hurt
    # the host); every child stays alive, so the count is what the limit allows.
    code = r"""
import errno, json, os, time
n, err = 0, None
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode[e.errno]
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(json.dumps({"forked": n, "error": err}), flush=True)
"""
    result = sbx.py(code, limits=Limits(pids=32), timeout_s=10)

    assert not result.timed_out
    assert result.exit_code == 0, result.log
    seen = report(result)
    assert seen["error"] == "EAGAIN"
    assert 16 <= seen["forked"] < 32  # the gate, python and the children share the 32
    assert result.workload_seconds < 5  # the sleeping children did not hold the run open
    assert _host_can_fork()


def test_fork_bomb_is_contained(sbx: Sbx, docker_client: docker.DockerClient) -> None:
    result = sbx.run(
        ["sh", "-c", "b() { b | b & }; b; sleep 1; echo survived"], limits=Limits(pids=64), timeout_s=10
    )

    t = result.timings
    assert t.finished - t.started < 10 + 1.0  # it ended, by itself or by the hard kill
    assert "Cannot fork" in result.log  # the limit bit
    assert _host_can_fork()
    assert docker_client.ping()


def test_leftover_processes_are_killed_when_the_workload_exits(sbx: Sbx) -> None:
    # The main process exits at once; a setsid'd, SIGTERM-ignoring grandchild must not hold the run.
    code = r"""
import os, signal, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    os._exit(0)
time.sleep(0.2)
print("main done", flush=True)
"""
    result = sbx.py(code, timeout_s=30)

    assert result.exit_code == 0, result.log
    assert not result.timed_out
    assert result.workload_seconds < 5
    assert "main done" in result.log


# -- 6. memory ------------------------------------------------------------------------------------


def test_memory_limit_oom_kills(sbx: Sbx) -> None:
    result = sbx.py(
        "b = bytearray(256 * 1024 * 1024)\nprint('survived', flush=True)", limits=Limits(memory_mb=64)
    )

    assert result.oom_killed
    assert result.exit_code == 137
    assert "survived" not in result.log
    assert not result.timed_out


def test_peak_memory_is_reported(sbx: Sbx) -> None:
    result = sbx.py("b = bytearray(100 * 1024 * 1024)\nprint('ok', flush=True)")

    assert result.exit_code == 0, result.log
    assert not result.oom_killed
    assert result.peak_memory_bytes is not None
    assert 100 * MiB < result.peak_memory_bytes < 1024 * MiB


# -- 7. log cap -----------------------------------------------------------------------------------


def test_log_is_capped_head_and_tail_kept(sbx: Sbx) -> None:
    cap = 64 * 1024
    code = r"""
import sys, time
out = sys.stdout
out.write("FIRST LINE\n")
block = ("y" * 1023 + "\n") * 1024
for _ in range(50):
    out.write(block)
out.write("LAST LINE\n")
out.flush()
time.sleep(0.3)
"""
    result = sbx.py(code, limits=Limits(log_bytes=cap))

    assert result.exit_code == 0
    total = len("FIRST LINE\n") + 50 * MiB + len("LAST LINE\n")
    assert result.log_truncated
    assert result.log_bytes == total
    markers = re.findall(r"\n\[ratchet: (\d+) bytes of output dropped here\]\n", result.log)
    assert len(markers) == 1
    marker_len = len(f"\n[ratchet: {markers[0]} bytes of output dropped here]\n")
    kept = len(result.log.encode()) - marker_len
    assert kept <= cap
    assert kept > cap - 100
    assert int(markers[0]) + kept == total
    assert result.log.startswith("FIRST LINE\nyyyy")
    assert result.log.endswith("y\nLAST LINE\n")


# -- 8. hard timeout ------------------------------------------------------------------------------


HOSTILE = r"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                time.sleep(0.05)
        os._exit(0)
print("spawned", flush=True)
while True:
    time.sleep(0.05)
"""


def test_hard_timeout_kills_whole_tree(rsbx: Sbx, docker_client: docker.DockerClient) -> None:
    timeout = 2.0
    result = rsbx.py(HOSTILE, timeout_s=timeout)

    assert result.timed_out
    assert not result.cancelled
    assert result.exit_code == 137
    assert "spawned" in result.log
    t = result.timings
    overrun = (t.finished - t.started) - timeout
    assert -0.05 <= overrun < 1.0, f"killed {overrun:.3f} s after the deadline"
    assert t.released - t.finished < 5
    # Gone the moment run() returns: no container, no volume, no process of it.
    assert leftovers(docker_client, f"{LABEL_SANDBOX}={rsbx.instance}") == []


# -- 9. cancel ------------------------------------------------------------------------------------


def test_cancel_from_another_thread(sbx: Sbx, docker_client: docker.DockerClient) -> None:
    result, elapsed = _cancel_while_running(sbx, docker_client)

    assert result.cancelled
    assert not result.timed_out
    assert result.exit_code == 137
    assert elapsed < 2.0
    assert result.timings.finished - result.timings.started < 10


def test_cancel_is_reported_when_the_stream_closes_first(
    sbx: Sbx, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kill that cancel() sends closes the attach stream; when the runner is waiting in select
    # at that moment (it usually is), the end of stream must still read as a cancel.
    monkeypatch.setattr(sandbox_runner, "select", _SlowSelect(min_wait=2.0))
    result, _ = _cancel_while_running(sbx, docker_client)

    assert result.cancelled
    assert result.exit_code == 137


def _cancel_while_running(sbx: Sbx, docker_client: docker.DockerClient) -> tuple[RunResult, float]:
    """Runs a sleeping workload in a thread, cancels it once it printed, returns (result, seconds)."""
    handle: list[PreparedRun] = []
    results: list[RunResult] = []
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    spec = sbx.spec(["python3", "-c", code], timeout_s=60)
    worker = threading.Thread(target=lambda: results.append(sbx.sandbox.run(spec, on_start=handle.append)))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until the workload itself runs
            if handle and b"started" in docker_client.api.logs(handle[0].container_id):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the workload never started")
        t0 = time.monotonic()
        handle[0].cancel()
        worker.join(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        if handle:
            handle[0].cancel()
        worker.join(timeout=60)
    assert results, "run() did not return"
    return results[0], elapsed


def test_cancel_before_execute_never_starts_workload(sbx: Sbx, docker_client: docker.DockerClient) -> None:
    run = sbx.sandbox.prepare(sbx.spec(["sh", "-c", "echo WORKLOAD RAN"]))
    try:
        run.cancel()
        container = docker_client.containers.get(run.container_id)
        assert container.wait(timeout=20)["StatusCode"] == 137  # the gate was killed, never opened
        assert b"WORKLOAD RAN" not in container.logs()
        result = run.execute()
    finally:
        run.release()

    assert result.cancelled
    assert result.exit_code is None
    assert result.timings.started is None
    assert result.log == ""
    assert result.log_bytes == 0


# -- 10. disk -------------------------------------------------------------------------------------


def test_disk_and_tmp_are_bounded(sbx: Sbx) -> None:
    code = r"""
import errno, json
out = {}
targets = [("workspace", "fill.bin"), ("output", "/sandbox/output/fill.bin"), ("tmp", "/tmp/fill.bin")]
for name, path in targets:
    n = 0
    try:
        with open(path, "wb") as f:
            for _ in range(64):
                f.write(b"z" * (1 << 20))
                f.flush()
                n += 1
        out[name] = ["OK", n]
    except OSError as e:
        out[name] = [errno.errorcode[e.errno], n]
    if name == "workspace":
        import os; os.unlink(path)
print(json.dumps(out), flush=True)
"""
    result = sbx.py(code, limits=Limits(disk_mb=8, tmp_mb=4))

    assert result.exit_code == 0, result.log
    seen = report(result)
    assert seen["workspace"][0] == "ENOSPC"
    assert 6 <= seen["workspace"][1] <= 8
    assert seen["output"][0] == "ENOSPC"  # output shares the per-run disk
    assert 6 <= seen["output"][1] <= 8
    assert seen["tmp"][0] == "ENOSPC"
    assert 2 <= seen["tmp"][1] <= 4


# -- 12. engine errors and bad specs -------------------------------------------------------------


def test_missing_image_raises_sandbox_error(sbx: Sbx) -> None:
    with pytest.raises(SandboxError, match="image"):
        sbx.run(["true"], image=f"ratchet/no-such-image:{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize(
    "change",
    [
        {"argv": []},
        {"argv": ["python3", ""]},
        {"image": ""},
        {"runtime": "kata"},
        {"user": "0:0"},
        {"user": "root"},
        {"timeout_s": 0},
        {"limits": Limits(pids=0)},
        {"limits": Limits(memory_mb=1)},
        {"limits": Limits(log_bytes=10)},
        {"files": [FileEntry(path="../escape.py", data=b"")]},
        {"files": [FileEntry(path="/etc/passwd", data=b"")]},
        {"files": [FileEntry(path="a.py", data=b""), FileEntry(path="a.py", data=b"")]},
        {"mounts": [Mount(source="data", target="/sandbox")]},
        {"labels": {"Bad Key": "x"}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_bad_spec_raises_spec_error_before_the_engine(sbx: Sbx, change: dict[str, Any]) -> None:
    # A client on a socket that does not exist: touching the engine would raise SandboxError.
    dead = docker.DockerClient(base_url=f"unix:///nonexistent/{uuid.uuid4().hex}.sock", version="1.41")
    blind = Sandbox(client=dead, instance=sbx.instance)
    kw: dict[str, Any] = {"argv": ["true"], **change}
    spec = sbx.spec(**kw)
    with pytest.raises(SpecError):
        blind.run(spec)
    with pytest.raises(SpecError):
        blind.prepare(spec)
    with pytest.raises(SandboxError):  # the same sandbox with a valid spec does reach for the engine
        blind.run(sbx.spec(["true"]))


def test_failing_on_start_callback_leaves_nothing_behind(
    sbx: Sbx, docker_client: docker.DockerClient
) -> None:
    def boom(run: PreparedRun) -> None:
        raise RuntimeError("bookkeeping failed")

    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        sbx.sandbox.run(sbx.spec(["true"]), on_start=boom)
    left = leftovers(docker_client, f"{LABEL_SANDBOX}={sbx.instance}")
    sbx.sandbox.remove_labelled({LABEL_SANDBOX: sbx.instance})  # the gate would wait forever
    assert left == [], "the prepared container (blocked in its gate) and its volume were abandoned"
