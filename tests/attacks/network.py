"""Network attempts, run as a candidate's train.py inside the sandbox (never on the host).

Only the host's own addresses are aimed at (127.0.0.1 and the host's address on the engine's
bridge); `CONFIG` ({"targets": [[host, port], ...], "udp": [[host, port], ...]}) is prepended by
the test. Findings go out as one `FINDINGS {json}` line, then a valid but poor summary."""

import errno
import json
import os
import socket

CONFIG: dict = globals().get("CONFIG", {})
out: dict = {}


def attempt(name, fn):
    try:
        result = fn()
        out[name] = "OK" if result is None else result
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def lines(path):
    try:
        return open(path).read().splitlines()
    except OSError as e:
        return [errno.errorcode.get(e.errno, str(e.errno))]


def tcp(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((host, port))


def udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"ratchet-probe", (host, port))


def raw(family, kind, proto):
    socket.socket(family, kind, proto).close()


out["proc_net_dev"] = sorted(line.split(":")[0].strip() for line in lines("/proc/net/dev")[2:])
attempt("sys_class_net", lambda: sorted(os.listdir("/sys/class/net")))
out["routes"] = [line for line in lines("/proc/net/route")[1:] if line.strip()]
v6 = [line.split() for line in lines("/proc/net/ipv6_route")]
out["ipv6_routes"] = sorted({fields[-1] for fields in v6 if len(fields) == 10})
out["if_nameindex"] = sorted(name for _, name in socket.if_nameindex())
for host, port in CONFIG.get("targets", []):
    attempt(f"tcp:{host}:{port}", lambda host=host, port=port: tcp(host, port))
for host, port in CONFIG.get("udp", []):
    attempt(f"udp:{host}:{port}", lambda host=host, port=port: udp(host, port))
attempt("raw_icmp", lambda: raw(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("raw_packet", lambda: raw(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))

print("FINDINGS " + json.dumps(out), flush=True)
print("---")
print("val_bpb: 2.000000")
