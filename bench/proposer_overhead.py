"""What a proposal costs before any agent thinks: a command proposer's sandbox run (the workspace
copied in with its context, the whole workspace collected back), the same with a network through
the allow-listing proxy, and a built-in search proposal, next to a plain sandboxed run of the same
trivial command measured in the same run.

    .venv/bin/python bench/proposer_overhead.py --runs 11

Needs the engine and ratchet/sandbox:latest. The egress case makes an `--internal` network of its
own (removed afterwards); nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import Egress, FileEntry, Limits, RunSpec, Sandbox  # noqa: E402
from service.proposal_models import Knob, SearchProposer  # noqa: E402
from service.rules import search  # noqa: E402

IMAGE = "ratchet/sandbox:latest"
EXAMPLE = ROOT / "examples" / "charlm"
EDIT = "import re; t = open('train.py').read(); open('train.py', 'w').write(t.replace('= 1e-3', '= 2e-3'))"


def _workspace() -> list[FileEntry]:
    files = [p for p in EXAMPLE.rglob("*") if p.is_file() and "candidates" not in p.parts]
    return [
        FileEntry(path=p.relative_to(EXAMPLE).as_posix(), data=p.read_bytes(), writable=p.name == "train.py")
        for p in files
        if p.name not in ("README.md", "ratchet.json")
    ]


def _time(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    client = docker.from_env()
    box = Sandbox(instance=f"bench-prop-{uuid.uuid4().hex[:6]}")
    labels = {"ratchet.bench": box.instance}
    files = _workspace()
    context = [
        FileEntry(path=n, data=b"x" * 2048) for n in ("results.tsv", "recent.md", "recent.json", "loop.json")
    ]
    limits = Limits(memory_mb=512, disk_mb=64)
    plain = RunSpec(image=IMAGE, argv=["python3", "-c", EDIT], files=files, limits=limits, labels=labels)
    proposer = RunSpec(
        image=IMAGE,
        argv=["python3", "-c", EDIT],
        files=files,
        inputs=context,
        collect=["."],
        limits=limits,
        labels=labels,
    )
    net = client.networks.create(f"bench-egress-{uuid.uuid4().hex[:6]}", internal=True, labels=labels)
    try:
        egress = RunSpec(
            image=IMAGE,
            argv=["python3", "-c", EDIT],
            files=files,
            inputs=context,
            collect=["."],
            egress=Egress(allow=["api.example.com:443"], network=net.name, image=IMAGE),
            limits=limits,
            labels=labels,
        )
        result = box.run(proposer)
        assert result.exit_code == 0 and b"2e-3" in result.workspace_files["train.py"], result.log
        rows = [
            ("sandboxed run, no collection (baseline)", _time(lambda: box.run(plain), args.runs)),
            (
                "command proposer: context in, workspace collected",
                _time(lambda: box.run(proposer), args.runs),
            ),
            ("  ... with egress (relay + proxy containers)", _time(lambda: box.run(egress), args.runs)),
        ]
    finally:
        box.remove_labelled(labels)
        net.remove()
    text = (EXAMPLE / "train.py").read_text()
    knobs = {
        "LEARNING_RATE": Knob(min=1e-4, max=3e-2, log=True),
        "HIDDEN_DIM": Knob(min=32, max=512, integer=True),
    }
    spec = SearchProposer(knobs=knobs)
    rows.append(("search proposal (pure, in the service)", _time(lambda: search.propose(spec, text, 7), 200)))
    base = statistics.median(rows[0][1])
    size = sum(len(f.data) for f in files)
    print(f"workspace: {len(files)} files, {size / 1024:.0f} KiB; {args.runs} runs each (search: 200)\n")
    print(f"| {'case':<52} | p50 s   | max s   | x baseline |")
    print(f"|{'-' * 54}|---------|---------|------------|")
    for name, times in rows:
        p50 = statistics.median(times)
        print(f"| {name:<52} | {p50:7.4f} | {max(times):7.4f} | {p50 / base:10.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
