"""API throughput under load: `wrk` with 32 connections on loopback against a real `ratchet serve`
while two experiments run in real containers, next to a minimal Litestar + aiosqlite service
(one SELECT by primary key; one INSERT committed on its own) with the same SQLite settings (WAL,
synchronous=FULL) measured in the same run.

    .venv/bin/python bench/api_throughput.py [--duration 10] [--connections 32]

Needs `wrk` (Debian: apt-get install wrk). What it sets up: a service with two slots; two loops
whose baselines sleep for ten minutes hold both slots (so their containers run throughout); a third
loop, `target`, whose baseline therefore stays queued, and so does every candidate submitted to it:
each submission is a whole new train.py (different bytes every request, so each one writes a new
blob, fsyncs it and commits its row before the 202), and none starts a container.
Reads: one running experiment (with its live log tail), the target loop (with its counts), and
the first ten experiments of the target loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
SLEEPER = ["python3", "-c", "import time; time.sleep(600)"]
TRAIN = "import os\nV = 1.0\nprint('---')\nprint(f'val_bpb: {V:.6f}')\n" + "".join(
    f"# line {i} of a small training script\n" for i in range(40)
)
POST_LUA = """
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
local n = 0
request = function()
  n = n + 1
  local body = BODY:gsub("MARK", tid .. "-" .. n)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


# -- the reference service -------------------------------------------------------------------------


class Item(msgspec.Struct):
    id: int
    name: str
    value: float


class ItemIn(msgspec.Struct):
    name: str
    value: float


def minimal_app(db_path: str):  # type: ignore[no-untyped-def]
    """One table, one SELECT, one INSERT: the floor any JSON-over-SQLite service stands on."""
    import aiosqlite
    from litestar import Litestar, get, post

    state: dict[str, aiosqlite.Connection] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = await aiosqlite.connect(db_path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=10000"):
            await db.execute(f"PRAGMA {pragma}")
        await db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, value REAL)")
        await db.execute("INSERT INTO items (name, value) VALUES ('first', 1.0)")
        state["db"] = db
        yield
        await db.close()

    @get("/items/{item_id:int}")
    async def read(item_id: int) -> Item:
        async with state["db"].execute("SELECT id, name, value FROM items WHERE id = ?", (item_id,)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return Item(id=row[0], name=row[1], value=row[2])

    @post("/items", status_code=202)
    async def write(data: ItemIn) -> Item:
        # autocommit: the INSERT is its own transaction, committed (and fsynced) before the answer
        cur = await state["db"].execute(
            "INSERT INTO items (name, value) VALUES (?, ?)", (data.name, data.value)
        )
        return Item(id=cur.lastrowid or 0, name=data.name, value=data.value)

    return Litestar([read, write], lifespan=[lifespan])


def serve_minimal(port: int, db_path: str) -> None:
    import uvicorn

    uvicorn.run(minimal_app(db_path), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- running things --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(argv: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} did not start:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=2).status_code < 500:
                    break
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=90)


class Result:
    def __init__(self, output: str) -> None:
        self.output = output
        self.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
        self.p50 = self._latency("50")
        self.p99 = self._latency("99")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        errors = re.search(r"Socket errors: (.*)", output)
        self.failed = int(bad.group(1)) if bad else 0
        self.socket_errors = errors.group(1) if errors else ""

    def _latency(self, pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", self.output, re.M)
        assert m, self.output
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def wrk(url: str, args: argparse.Namespace, body: str | None = None) -> Result:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        if body is not None:
            fh.write(f"BODY = {json.dumps(body)}\n{POST_LUA}")
            cmd += ["-s", fh.name]
    try:
        done = subprocess.run([*cmd, url], capture_output=True, text=True, check=False)
    finally:
        os.unlink(fh.name)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    return Result(done.stdout)


def post_body(template: dict[str, object]) -> str:
    """JSON in which wrk replaces every MARK with its thread and request number."""
    return json.dumps(template)


# -- the benchmark ---------------------------------------------------------------------------------


def loop_body(name: str, command: list[str], budget: float) -> dict[str, object]:
    return {
        "name": name,
        "workspace": {"files": {"train.py": TRAIN, "prepare.py": "SECRET = 1\n"}},
        "editable": ["train.py"],
        "command": command,
        "time_budget_s": budget,
        "timeout_s": budget + 60,
        "resources": {"cpus": 0.25, "memory_mb": 128, "pids": 64, "disk_mb": 16},
    }


def prepare_ratchet(client: httpx.Client) -> dict[str, Any]:
    busy = []
    for name in ("busy-a", "busy-b"):
        r = client.post("/v1/loops", json=loop_body(name, SLEEPER, 600))
        r.raise_for_status()
        busy.append(r.json()["id"])
    deadline = time.monotonic() + 180  # a busy engine can take a while to start containers
    while client.get(f"/v1/loops/{busy[1]}").json()["counts"]["running"] < 1:
        if time.monotonic() > deadline:
            states = [client.get(f"/v1/loops/{b}/experiments").json()["items"][0] for b in busy]
            raise RuntimeError(f"the sleeping baselines did not start: {states}")
        time.sleep(0.2)
    running = client.get(f"/v1/loops/{busy[0]}/experiments").json()["items"][0]
    r = client.post("/v1/loops", json=loop_body("target", ["python3", "train.py"], 30))
    r.raise_for_status()
    target = r.json()["id"]
    for i in range(20):  # a few queued candidates, so the list has a page to show
        files = {"train.py": TRAIN.replace("V = 1.0", f"V = 0.{i + 1}")}
        client.post(f"/v1/loops/{target}/experiments", json={"description": f"warm {i}", "files": files})
    return {"target": target, "running": running["id"], "busy": busy[0], "loops": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="every case once per round, interleaved")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve-minimal", nargs=2, metavar=("PORT", "DB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_minimal:
        serve_minimal(int(args.serve_minimal[0]), args.serve_minimal[1])
        return
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="ratchet-api-") as tmp:
        mport, rport = free_port(), free_port()
        minimal, ratchet = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{rport}"
        env = {**os.environ, "RATCHET_INSTANCE": f"bench-api-{rport}"}
        argv = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(rport),
            "--data-dir",
            f"{tmp}/data",
            "--slots",
            "2",
        ]
        with (
            process([sys.executable, __file__, "--serve-minimal", str(mport), f"{tmp}/minimal.db"],
                    f"{minimal}/items/1", Path(tmp) / "minimal.log"),
            process(argv, f"{ratchet}/readyz", Path(tmp) / "ratchet.log", env),
            httpx.Client(base_url=ratchet, timeout=60) as client,
        ):  # fmt: skip
            ids = prepare_ratchet(client)
            files = {"train.py": TRAIN.replace("V = 1.0", "V = 0.5  # MARK")}
            cases = [
                ("minimal", "GET one row", f"{minimal}/items/1", None),
                ("ratchet", "GET experiment (running)", f"{ratchet}/v1/experiments/{ids['running']}", None),
                ("ratchet", "GET loop", f"{ratchet}/v1/loops/{ids['target']}", None),
                ("ratchet", "GET experiments?limit=10",
                 f"{ratchet}/v1/loops/{ids['target']}/experiments?limit=10", None),
                ("minimal", "POST one row", f"{minimal}/items", post_body({"name": "MARK", "value": 1.5})),
                ("ratchet", "POST experiment", f"{ratchet}/v1/loops/{ids['target']}/experiments",
                 post_body({"description": "bench MARK", "files": files})),
            ]  # fmt: skip
            runs: dict[str, list[Result]] = {name: [] for _, name, _, _ in cases}
            for _ in range(args.rounds):
                for _, name, url, body in cases:
                    runs[name].append(wrk(url, args, body))
            running = client.get(f"/v1/loops/{ids['busy']}").json()["counts"]["running"]
            assert running == 1, "the sleeping experiment stopped during the run"
            queued = client.get(f"/v1/loops/{ids['target']}").json()["counts"]["queued"]
            client.post(f"/v1/loops/{ids['target']}/stop")
            for loop_id in ids["loops"]:
                client.post(f"/v1/loops/{loop_id}/stop")
    report([(who, name, runs[name]) for who, name, _, _ in cases], args, queued)


def report(rows: list[tuple[str, str, list[Result]]], args: argparse.Namespace, queued: int) -> None:
    """Medians over the rounds; the ratio is the median of each round's ratio to the reference
    measured in the same round."""
    base = {name: results for who, name, results in rows if who == "minimal"}
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s on loopback, {args.rounds} interleaved"
        f" rounds; 2 experiments running; {queued} candidates queued at the end"
    )
    head = f"{'service':<9}{'request':<28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    print(f"{head}{'x minimal':>10}{'errors':>8}")
    for who, name, results in rows:
        ref = base["POST one row"] if name.startswith("POST") else base["GET one row"]
        ratio = statistics.median(r.rps / b.rps for r, b in zip(results, ref, strict=True))
        rps, p50, p99 = (statistics.median(getattr(r, k) for r in results) for k in ("rps", "p50", "p99"))
        errors = sum(r.failed for r in results)  # non-2xx answers: every one is a failed request
        print(f"{who:<9}{name:<28}{rps:>9.0f}{p50:>9.2f}{p99:>9.2f}{ratio:>10.2f}{errors:>8}")


if __name__ == "__main__":
    main()
