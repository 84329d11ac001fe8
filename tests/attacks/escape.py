"""Escape attempts, run as a candidate's train.py inside the sandbox (never on the host).

Each attempt is recorded as "OK" or the errno name it failed with; the findings go out as one
`FINDINGS {json}` line, then a valid but poor summary so the run itself is judged normally.
`CONFIG` (host paths to look for) is prepended by the test."""

import ctypes
import errno
import json
import os
import socket
import stat
import subprocess
import time

CONFIG: dict = globals().get("CONFIG", {})
libc = ctypes.CDLL(None, use_errno=True)
out: dict = {}


def attempt(name, fn):
    try:
        result = fn()
        out[name] = "OK" if result is None else result
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))


def call(fn, *args):
    if fn(*args) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def write(path, data="x", mode="a"):
    with open(path, mode) as f:
        f.write(data)


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def peek(path):
    with open(path, "rb") as f:
        f.read(1)


def connect_unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)


def setuid_binary_ids(path):
    """A setuid-root binary blocked on its password prompt: which ids does it really run with?"""
    proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        lines = read(f"/proc/{proc.pid}/status", "r").splitlines()
        return [line.split()[1:] for line in lines if line.startswith(("Uid:", "Gid:"))]
    finally:
        proc.kill()
        proc.wait()


def ptrace_gate():
    call(libc.ptrace, 16, 1, None, None)  # PTRACE_ATTACH to the gate (PID 1)
    time.sleep(0.1)
    libc.ptrace(17, 1, None, None)  # PTRACE_DETACH


# read-only files: the harness, at the top and in a sub-directory, and the image
attempt("write_harness", lambda: write("prepare.py", "# changed"))
attempt("write_harness_subdir", lambda: write("lib/eval.py", "# changed"))
attempt("replace_harness", lambda: os.rename("train.py", "prepare.py"))
attempt("write_root", lambda: write("/pwned", mode="w"))
attempt("write_etc", lambda: write("/etc/passwd"))
attempt("write_usr", lambda: write("/usr/bin/python3"))
# the engine's socket and the host's files
for sock in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"):
    attempt(f"engine_socket:{sock}", lambda sock=sock: connect_unix(sock))
for path in CONFIG.get("host_paths", []):
    attempt(f"host_path:{path}", lambda path=path: peek(path))
attempt("read_shadow", lambda: peek("/etc/shadow"))
out["mounts"] = sorted({line.split()[4] for line in read("/proc/self/mountinfo", "r").splitlines()})
out["processes"] = sorted((int(p), os.stat(f"/proc/{p}").st_uid) for p in os.listdir("/proc") if p.isdigit())
# kernel settings
attempt("proc_sys_write", lambda: write("/proc/sys/kernel/hostname", "pwned", "w"))
attempt("proc_sys_vm", lambda: write("/proc/sys/vm/drop_caches", "3", "w"))
attempt("sysrq_trigger", lambda: write("/proc/sysrq-trigger", "h", "w"))
attempt("sys_write", lambda: write("/sys/kernel/uevent_helper", "/pwned", "w"))
# privileges
attempt("setuid_binary", lambda: setuid_binary_ids("/usr/bin/su"))
attempt("setuid_root", lambda: os.setuid(0))
attempt("chroot", lambda: os.chroot("/tmp"))
attempt("mknod_disk", lambda: os.mknod("/tmp/sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0)))
if out["mknod_disk"] == "OK":  # a node made anyway must still lead nowhere
    attempt("open_mknod_disk", lambda: peek("/tmp/sda"))
attempt("mount_tmpfs", lambda: call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None))
attempt("ptrace_gate", ptrace_gate)
attempt("bpf", lambda: call(libc.syscall, 321, 0, 0, 0))  # x86_64 bpf(BPF_MAP_CREATE, NULL, 0)
# last: a new user namespace would change what the attempts above see
attempt("unshare_user_mount", lambda: call(libc.unshare, 0x10000000 | 0x00020000))
if out["unshare_user_mount"] == "OK":
    attempt("mount_in_user_ns", lambda: call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None))

print("FINDINGS " + json.dumps(out), flush=True)
print("---")
print("val_bpb: 2.000000")
