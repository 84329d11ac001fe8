"""What the service benchmarks share: a real `ratchet serve` on a free port with its own data dir,
a loop whose workload stamps its own start and end, and the plain `docker run --rm` baseline.

The workload (`sh train.sh`) prints `t_start` (its first instruction) and `t_end` (its last) in its
summary block, from inside the container, whose clock is the host's; the service stores them as
metrics, so every instant a benchmark reads comes from the workload itself, not from the service
it measures.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

__all__ = [
    "IMAGE",
    "TRIVIAL",
    "Service",
    "docker_run",
    "histogram_quantile",
    "pct",
    "workload",
]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ratchet/sandbox:latest"
TRIVIAL = "echo ---; echo val_bpb: 1.0"  # the trivial command, timed as a plain `docker run --rm` too


def workload(hold_s: float, tag: str) -> str:
    """train.sh: TRIVIAL after `hold_s` seconds standing in for training, stamped at both ends."""
    hold = f"sleep {hold_s:g}\n" if hold_s > 0 else ""
    return f'S=$(date +%s.%N)\n{hold}{TRIVIAL}\necho "t_start: $S"\necho "t_end: $(date +%s.%N)"\n# {tag}\n'


def docker_run(runtime: str) -> float:
    t0 = time.monotonic()
    cmd = ["docker", "run", "--rm", "--network", "none", "--runtime", runtime, IMAGE, "sh", "-c", TRIVIAL]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def histogram_quantile(q: float, text: str, name: str, loop: str) -> float:
    """Prometheus' histogram_quantile over one loop's buckets in a /metrics exposition."""
    pattern = re.compile(rf'^{name}_bucket\{{le="([^"]+)",loop="{re.escape(loop)}"\}} (\S+)$', re.M)
    buckets = sorted((float(le), float(n)) for le, n in pattern.findall(text))
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


class Service:
    """A `ratchet serve` process for one benchmark phase; `close()` stops it and removes its data."""

    def __init__(self, slots: int, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="ratchet-bench-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.instance = f"bench-{os.getpid()}-{self.port}"
        env = {**os.environ, "RATCHET_INSTANCE": self.instance, "RATCHET_LOG_LEVEL": "warning", **(env or {})}
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        argv += ["--data-dir", str(self.data_dir), "--slots", str(slots)]
        self._log = open(self.data_dir / "server.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start:\n{self.log()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")

    def create_loop(self, name: str, runtime: str, hold_s: float, timeout_s: float = 120) -> str:
        body = {
            "name": name,
            "workspace": {"files": {"train.sh": workload(hold_s, "baseline")}},
            "editable": ["train.sh"],
            "command": ["sh", "train.sh"],
            "metric": {"name": "val_bpb", "direction": "minimize"},
            "time_budget_s": max(1.0, hold_s),
            "timeout_s": timeout_s,
            "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 128, "disk_mb": 16},
            "runtime": runtime,
        }
        r = self.client.post("/v1/loops", json=body)
        r.raise_for_status()
        loop_id = r.json()["id"]
        self.wait_idle(loop_id)
        return loop_id

    def submit(self, loop_id: str, hold_s: float, n: int) -> list[str]:
        ids = []
        for i in range(n):
            files = {"train.sh": workload(hold_s, f"candidate {i}")}
            body = {"description": f"c{i}", "files": files}
            r = self.client.post(f"/v1/loops/{loop_id}/experiments", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])
        return ids

    def wait_idle(self, loop_id: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.client.get(f"/v1/loops/{loop_id}").json()["counts"]
            if counts["queued"] == 0 and counts["running"] == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"loop {loop_id} still busy:\n{self.log()[-3000:]}")

    def experiments(self, ids: list[str]) -> list[dict]:
        exps = [self.client.get(f"/v1/experiments/{i}").json() for i in ids]
        bad = [e for e in exps if e["status"] not in ("keep", "discard")]
        if bad:
            raise RuntimeError(f"{len(bad)} experiment(s) failed, e.g. {bad[0]}")
        return exps

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
