"""torch.compile start-up of examples/gpt, cold versus with a warm compile cache, in ratchet/torch
containers hardened like the sandbox's, and what the cache holds and costs.

    .venv/bin/python bench/compile_cache.py [--repeat 1] [--cpus 2] [--gpu ID] [--keep DIR]

Every scenario is a fresh container: the sandbox's own options (`sandbox.container_options`: read-only
root, uid 1000, no network, all capabilities dropped, limits) with examples/gpt read-only as the
workspace, the dataset read-only at ~/.cache/ratchet-gpt, GPT_COMPILE=1 and a 2 s budget. The time
is train.py's `startup_seconds`: from the interpreter's first statement to the end of the first
training step, which is where torch.compile does its work. One exception to the sandbox's options:
/tmp is mounted with `exec`, because the compile cache holds shared objects that are loaded from it
and Docker mounts a tmpfs `noexec` unless told otherwise (the sandbox's /tmp is `noexec` today).

Scenarios (each run against its own copy of the cache a cold run filled, owned by uid 1000):
    eager (no compile)                 torch.compile off: the floor
    cold                               empty cache directory
    warm, same path                    the copy at the path the cold run used
    warm, another path                 the copy at another path
    warm, private copy of a read-only  the cache mounted read-only, copied by uid 1000 into /tmp
      cache                            first (the copy counts in the start-up)
    warm, read-only cache in place     the read-only mount used as the cache directory
    warm, without aotautograd/         copy minus the AOTAutograd cache
    warm, without fxgraph/ + aot...    copy minus the FX graph and AOTAutograd caches
    warm, only fxgraph/ + aot...       copy without the compiled kernels (the xx/ directories)
    warm, candidate: ...               the copy, with train.py edited as a candidate would: the
                                       learning rate (same graph), or the model's width (new graph)
    cold / warm, compile threads 1     TORCHINDUCTOR_COMPILE_THREADS=1: no pool of compile workers
The dataset is built into a temporary directory first (examples/gpt/prepare.py in the image).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from sandbox import Limits, RunSpec, Sandbox, container_options

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gpt"
IMAGE = "ratchet/torch:latest"
DATA_TARGET = "/home/sandbox/.cache/ratchet-gpt"
UID = 1000
# Runs after train.py (atexit), in the same process: torch's own cache counters.
WRAPPER = (
    "import atexit, json, runpy, sys\n"
    "def _dump():\n"
    "    from torch._dynamo.utils import compile_times, counters\n"
    "    print('COUNTERS ' + json.dumps({k: dict(v) for k, v in counters.items()}))\n"
    "    print('PHASES ' + json.dumps(compile_times(repr='str', aggregate=True)))\n"
    "atexit.register(_dump)\n"
    "sys.path.insert(0, '.')\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


PY = 'python3 -c "$WRAPPER"'


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.client = docker.from_env(timeout=600)
        self.label = f"bench-compile-{uuid.uuid4().hex[:8]}"
        self.dataset = work / "data" / "gpt-data"

    def options(self, command: str, binds: dict[str, dict[str, str]], env: dict[str, str]) -> dict[str, Any]:
        gpus = [self.args.gpu] if self.args.gpu is not None else []
        spec = RunSpec(
            image=IMAGE,
            argv=["sh", "-c", command],
            gpus=gpus,
            limits=Limits(cpus=self.args.cpus, memory_mb=8192, pids=1024, tmp_mb=2048),
        )
        # GPUs attach the way this engine supports (the nvidia driver or CDI), as in the sandbox
        route = Sandbox(self.client, instance=self.label).gpu_probe(IMAGE).route if gpus else "none"
        opts = container_options(spec, "unused", {"ratchet.bench": self.label}, env, route)
        opts.pop("entrypoint")  # no gate: the workload starts with the container
        opts.update(
            command=["sh", "-c", command], stdin_open=False, volumes=binds, working_dir="/sandbox/workspace"
        )
        opts["tmpfs"] = {"/tmp": opts["tmpfs"]["/tmp"] + ",exec"}
        return opts

    def run(
        self, command: str, binds: dict[str, dict[str, str]], env: dict[str, str], workspace: Path = EXAMPLE
    ) -> tuple[str, float, int]:
        binds = {
            str(workspace): {"bind": "/sandbox/workspace", "mode": "ro"},
            str(self.dataset): {"bind": DATA_TARGET, "mode": "ro"},
            **binds,
        }
        env = {"RATCHET_TIME_BUDGET_S": "2", "GPT_COMPILE": "1", **env}
        t0 = time.monotonic()
        c = self.client.containers.create(**self.options(command, binds, env))
        try:
            c.start()
            code = c.wait(timeout=1800)["StatusCode"]
            log = c.logs().decode(errors="replace")
        finally:
            c.remove(force=True)
        wall = time.monotonic() - t0
        return log, wall, code

    def prepare_dataset(self) -> None:
        out = self.work / "data"
        out.mkdir()
        os.chown(out, UID, UID)
        self.client.containers.run(
            IMAGE,
            ["python3", "/examples/gpt/prepare.py", "--data-dir", "/out/gpt-data"],
            user=f"{UID}:{UID}",
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            tmpfs={"/tmp": "size=64m"},
            volumes={
                str(EXAMPLE.parent): {"bind": "/examples", "mode": "ro"},
                str(out): {"bind": "/out", "mode": "rw"},
            },
            labels={"ratchet.bench": self.label},
            remove=True,
        )
        self.dataset = out / "gpt-data"

    def workspace(self, name: str, edit: tuple[str, str]) -> Path:
        """examples/gpt with one line of train.py replaced: a candidate the loop's cache was not made for."""
        ws = self.work / f"ws-{name}"
        ws.mkdir()
        for f in ("train.py", "prepare.py"):
            shutil.copy(EXAMPLE / f, ws / f)
        source = (ws / "train.py").read_text()
        assert edit[0] in source, edit
        (ws / "train.py").write_text(source.replace(edit[0], edit[1], 1))
        return ws

    def empty(self, name: str) -> Path:
        path = self.work / name
        path.mkdir()
        os.chown(path, UID, UID)
        return path

    def copy_of(self, src: Path, drop: list[str] | None = None, keep_only: list[str] | None = None) -> Path:
        """A copy of the cache `src` (holding inductor/), optionally without some of inductor/'s entries."""
        dst = self.work / f"copy-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, dst, symlinks=True)
        for entry in list((dst / "inductor").iterdir()):
            if (drop and entry.name in drop) or (keep_only is not None and entry.name not in keep_only):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        subprocess.run(["chown", "-R", f"{UID}:{UID}", str(dst)], check=True)
        return dst


def parse(log: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in log.splitlines():
        if line.startswith("COUNTERS "):
            counters = json.loads(line[len("COUNTERS ") :])
            inductor = counters.get("inductor", {})
            aot = counters.get("aot_autograd", {})
            out["fx"] = f"{inductor.get('fxgraph_cache_hit', 0)}/{inductor.get('fxgraph_cache_miss', 0)}"
            out["aot"] = f"{aot.get('autograd_cache_hit', 0)}/{aot.get('autograd_cache_miss', 0)}"
        if line.startswith("PHASES "):
            out["phases"] = json.loads(line[len("PHASES ") :])
        if line.startswith("copy_ms "):
            out["copy_s"] = int(line.split()[1]) / 1000
        key, _, value = line.partition(":")
        if key.strip() in ("startup_seconds", "val_bpb"):
            out[key.strip()] = float(value)
    # a copy made before the interpreter starts is part of the start-up
    out["startup_seconds"] = out.get("startup_seconds", float("nan")) + out.get("copy_s", 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="runs per warm scenario (median reported)")
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--gpu", help="host GPU id: run on that GPU (default: CPU)")
    ap.add_argument("--keep", type=Path, help="copy the cold run's cache here")
    ap.add_argument("--phases", action="store_true", help="print torch's compile phase times (cold, warm)")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every run, e.g. TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS=0",
    )
    ap.add_argument(
        "--only",
        action="append",
        help="run only the scenarios whose name contains this (repeatable; eager and cold always run)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        b = Bench(args, Path(tmp))
        b.prepare_dataset()
        rows: list[tuple[str, list[dict[str, Any]]]] = []
        extra_env = dict(kv.split("=", 1) for kv in args.env)

        def at(path: str, **extra: str) -> dict[str, str]:
            return {
                "TORCHINDUCTOR_CACHE_DIR": f"{path}/inductor",
                "TRITON_CACHE_DIR": f"{path}/inductor/triton",
                **extra,
            }

        def scenario(
            name: str,
            make: Any,
            env: dict[str, str],
            repeat: int = args.repeat,
            copy: bool = False,
            workspace: Path = EXAMPLE,
        ) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            if (
                args.only
                and name not in ("eager (no compile)", "cold")
                and not any(o in name for o in args.only)
            ):
                return got
            for _ in range(repeat):
                binds = make()
                command = PY
                if copy:  # the private writable copy, made by uid 1000 before the interpreter starts
                    command = (
                        "t0=$(date +%s%N); cp -a /cache-ro/. /tmp/cache/ && "
                        "echo copy_ms $(( ($(date +%s%N) - t0) / 1000000 )) && " + PY
                    )
                log, wall, code = b.run(command, binds, {"WRAPPER": WRAPPER, **extra_env, **env}, workspace)
                r = parse(log) | {"wall": wall}
                if code != 0:
                    r["failed"] = next(
                        (ln.strip() for ln in reversed(log.splitlines()) if "Error" in ln), f"exit {code}"
                    )[:150]
                got.append(r)
                phases = r.pop("phases", "")
                print(f"  {name}: {r}", flush=True)
                if name in ("cold", "warm, same path") and len(got) == 1 and args.phases:
                    print("    " + phases.replace("\n", "\n    "), flush=True)
            rows.append((name, got))
            return got

        def rw(src: Path, path: str = "/cache") -> dict[str, dict[str, str]]:
            return {str(src): {"bind": path, "mode": "rw"}}

        print(
            f"{IMAGE}, examples/gpt, env {extra_env or '-'}, cpus {args.cpus}, "
            f"{'GPU ' + args.gpu if args.gpu else 'CPU'}, {args.repeat} run(s) per scenario",
            flush=True,
        )
        scenario("eager (no compile)", dict, {"GPT_COMPILE": "0"})
        colds: list[Path] = []
        scenario("cold", lambda: rw(colds.append(b.empty(f"cold{len(colds)}")) or colds[-1]), at("/cache"))
        seed = colds[0]
        if args.keep:
            shutil.copytree(seed, args.keep, symlinks=True, dirs_exist_ok=True)
        inductor = seed / "inductor"
        scenario("warm, same path", lambda: rw(b.copy_of(seed)), at("/cache"))
        scenario("warm, another path", lambda: rw(b.copy_of(seed), "/elsewhere/cc"), at("/elsewhere/cc"))
        scenario(
            "warm, private copy of a read-only cache",
            lambda: {str(b.copy_of(seed)): {"bind": "/cache-ro", "mode": "ro"}},
            at("/tmp/cache"),
            copy=True,
        )
        scenario(
            "warm, read-only cache in place",
            lambda: {str(b.copy_of(seed)): {"bind": "/cache", "mode": "ro"}},
            at("/cache"),
            repeat=1,
        )
        scenario(
            "warm, without aotautograd/", lambda: rw(b.copy_of(seed, drop=["aotautograd"])), at("/cache")
        )
        scenario(
            "warm, without fxgraph/ + aotautograd/",
            lambda: rw(b.copy_of(seed, drop=["fxgraph", "aotautograd"])),
            at("/cache"),
        )
        scenario(
            "warm, only fxgraph/ + aotautograd/",
            lambda: rw(b.copy_of(seed, keep_only=["fxgraph", "aotautograd"])),
            at("/cache"),
            repeat=1,
        )
        lr = b.workspace("lr", ("MATRIX_LR = 1e-3", "MATRIX_LR = 1e-2"))
        scenario("warm, candidate: MATRIX_LR 1e-2", lambda: rw(b.copy_of(seed)), at("/cache"), workspace=lr)
        wide = b.workspace("wide", ("CPU_MODEL_DIM = 64", "CPU_MODEL_DIM = 96"))
        scenario(
            "warm, candidate: CPU_MODEL_DIM 96", lambda: rw(b.copy_of(seed)), at("/cache"), workspace=wide
        )
        one = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
        colds1: list[Path] = []
        scenario(
            "cold, compile threads 1",
            lambda: rw(colds1.append(b.empty(f"cold1-{len(colds1)}")) or colds1[-1]),
            at("/cache", **one),
        )
        scenario("warm, compile threads 1", lambda: rw(b.copy_of(seed)), at("/cache", **one))

        cold = statistics.median(r["startup_seconds"] for r in rows[1][1])
        print()
        print(
            f"{'scenario':<42}{'start-up s':>11}{'range':>13}{'x cold':>8}{'fx hit/miss':>13}"
            f"{'aot hit/miss':>14}  result"
        )
        for name, got in rows:
            ok = [r for r in got if "failed" not in r]
            ups = [r["startup_seconds"] for r in ok]
            mid = statistics.median(ups) if ups else float("nan")
            span = f"{min(ups):.1f}-{max(ups):.1f}" if len(ups) > 1 else ""
            last = got[-1]
            result = last.get("failed", "ok" + (f" (copy {last['copy_s']:.2f}s)" if "copy_s" in last else ""))
            print(
                f"{name:<42}{mid:>11.1f}{span:>13}{mid / cold:>8.2f}{last.get('fx', '-'):>13}"
                f"{last.get('aot', '-'):>14}  {result}"
            )
        sizes: dict[str, int] = {}
        for p in inductor.iterdir():
            # two-character directories hold the generated kernels: source, .so, wrapper module
            kind = (
                "kernels (xx/)" if len(p.name) == 2 and p.is_dir() else p.name + ("/" if p.is_dir() else "")
            )
            sizes[kind] = sizes.get(kind, 0) + (du(p) if p.is_dir() else p.lstat().st_size)
        print(
            f"\ncache after a cold run (TORCHINDUCTOR_CACHE_DIR): {sum(sizes.values()):,} bytes, "
            f"{sum(1 for p in inductor.rglob('*') if p.is_file()):,} files"
        )
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<16}{size:>12,}")


if __name__ == "__main__":
    main()
