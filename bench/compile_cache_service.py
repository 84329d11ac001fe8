"""torch.compile start-up of examples/gpt through the service: cold, and with the loop's warm cache.

    .venv/bin/python bench/compile_cache_service.py [--repeat 2] [--cpus 2] [--budget 5]

A real `ratchet serve` (one slot, the dataset declared with `--dataset gpt-data=DIR`) runs the
examples/gpt loop with `GPT_COMPILE=1` in `ratchet/torch`, as a user would. The figure is train.py's
own `startup_seconds` (from the interpreter's first statement to the end of the first training
step, where torch.compile works), read from each experiment's metrics:

    cold            the loop's baseline with no cache: it compiles, and fills the loop's cache
                    (repeats: `DELETE /v1/loops/{id}/cache`, then `POST .../cache/fill`)
    warm, baseline  a re-run of the baseline (`POST /v1/loops/{id}/baseline`): a private copy of
                    the loop's cache in its cache directory
    warm, candidate the `better_lr` candidate (learning rates only: the compiled graph is the same)

Every run is submitted alone, after the previous one ended, so none is prepared before the cache it
should see exists. The cache's bytes come from the loop view; what copying it into a run costs is
measured beside: a sandbox prepared with the stored cache against one without (median of 5).
The dataset is built into a temporary directory first (examples/gpt/prepare.py in the image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import docker
import msgspec
from harness import ROOT, Service

from client import loop_body_from_dir
from sandbox import Limits, RunSpec, Sandbox

EXAMPLE = ROOT / "examples" / "gpt"
IMAGE = "ratchet/torch:latest"
UID = 1000


def prepare_dataset(work: Path, label: str) -> Path:
    out = work / "data"
    out.mkdir()
    os.chown(out, UID, UID)
    docker.from_env().containers.run(
        IMAGE, ["python3", "/examples/gpt/prepare.py", "--data-dir", "/out/gpt-data"],
        user=f"{UID}:{UID}", network_mode="none", read_only=True, cap_drop=["ALL"],
        tmpfs={"/tmp": "size=64m"}, labels={"ratchet.bench": label}, remove=True,
        volumes={
            str(EXAMPLE.parent): {"bind": "/examples", "mode": "ro"},
            str(out): {"bind": "/out", "mode": "rw"},
        },
    )  # fmt: skip
    work.chmod(0o755)
    return out / "gpt-data"


class Run:
    def __init__(self, srv: Service, loop_id: str) -> None:
        self.srv, self.loop_id = srv, loop_id

    def finish(self, exp: dict) -> dict:
        self.srv.wait_idle(self.loop_id, timeout=1800)
        done = self.srv.client.get(f"/v1/experiments/{exp['id']}").json()
        if done["status"] not in ("keep", "discard"):
            raise RuntimeError(
                f"{done['description']}: {done['status']} {done['reason']}\n{done['log_tail']}"
            )
        return done

    def post(self, path: str, **body: object) -> dict:
        r = self.srv.client.post(f"/v1/loops/{self.loop_id}{path}", json=body or None)
        r.raise_for_status()
        return self.finish(r.json())

    def cache(self) -> dict | None:
        return self.srv.client.get(f"/v1/loops/{self.loop_id}").json()["cache"]


def copy_cost(cache: bytes, label: str, repeat: int = 5) -> tuple[float, float]:
    """Median seconds to prepare a run (container started behind its gate, workspace in) without
    and with the cache copied into its cache directory."""
    sbx = Sandbox(instance=label)
    spec = RunSpec(image=IMAGE, argv=["true"], limits=Limits(cache_mb=max(64, 2 * len(cache) >> 20)))
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(repeat):
            for seeded in (False, True):
                t0 = time.monotonic()
                run = sbx.prepare(msgspec.structs.replace(spec, cache=cache if seeded else b""))
                times[seeded].append(time.monotonic() - t0)
                run.release()
    finally:
        sbx.remove_labelled({"ratchet.sandbox": label})
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="cold runs and warm runs of each kind")
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--budget", type=float, default=5.0, help="training budget per run, seconds")
    args = ap.parse_args()
    label = f"bench-cc-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-ccs-") as tmp:
        data = prepare_dataset(Path(tmp), label)
        srv = Service(slots=1, env={"RATCHET_DATASETS": f"gpt-data={data}", "RATCHET_PREPARE_AHEAD": "0"})
        try:
            body = loop_body_from_dir(
                EXAMPLE, name="gpt-compile", time_budget_s=args.budget, timeout_s=args.budget + 600,
                env={"GPT_COMPILE": "1"},
                resources={"gpus": 0, "cpus": args.cpus, "memory_mb": 8192, "pids": 1024},
            )  # fmt: skip
            r = srv.client.post("/v1/loops", json=body)
            r.raise_for_status()
            run = Run(srv, r.json()["id"])
            root = r.json()["root_snapshot"]  # each candidate is the same edit of the baseline
            base = srv.client.get(f"/v1/loops/{run.loop_id}/experiments").json()["items"][0]
            rows: dict[str, list[dict]] = {
                "cold": [run.finish(base)],
                "warm, baseline": [],
                "warm, candidate": [],
            }
            cache = run.cache()
            patch = (EXAMPLE / "candidates" / "better_lr.patch").read_text()
            for i in range(args.repeat):
                if i:
                    srv.client.delete(f"/v1/loops/{run.loop_id}/cache").raise_for_status()
                    rows["cold"].append(run.post("/cache/fill"))
                rows["warm, baseline"].append(run.post("/baseline"))
                if not i:
                    got = run.post("/experiments", description="better_lr", patch=patch, parent=root)
                else:  # the same snapshot again: a rerun (a second submission is answered as a duplicate)
                    r = srv.client.post(f"/v1/experiments/{rows['warm, candidate'][0]['id']}/rerun")
                    r.raise_for_status()
                    got = run.finish(r.json())
                rows["warm, candidate"].append(got)
                for name, got in rows.items():
                    ups = [round(e["metrics"].get("startup_seconds", float("nan")), 1) for e in got]
                    print(f"  {name}: start-up {ups} s", flush=True)
            stored = next(Path(srv.data_dir, "caches").glob("*.tar")).read_bytes()
        finally:
            srv.close()
    without, with_cache = copy_cost(stored, label)
    cold = statistics.median(e["metrics"]["startup_seconds"] for e in rows["cold"])
    print(f"\n{IMAGE}, examples/gpt, GPT_COMPILE=1, --cpus {args.cpus:g}, budget {args.budget:g} s,")
    print("through the service\n")
    print(f"{'run':<18}{'n':>3}{'start-up s (median)':>22}{'range':>13}{'x cold':>8}{'val_bpb':>10}")
    for name, got in rows.items():
        ups = [e["metrics"]["startup_seconds"] for e in got]
        mid = statistics.median(ups)
        span = f"{min(ups):.1f}-{max(ups):.1f}" if len(ups) > 1 else ""
        bpb = statistics.median(e["metric"] for e in got)
        print(f"{name:<18}{len(ups):>3}{mid:>22.1f}{span:>13}{mid / cold:>8.2f}{bpb:>10.3f}")
    assert cache is not None
    size = f"{cache['bytes']:,} bytes in {cache['files']} files (stored tar {len(stored):,} bytes)"
    print(f"\nthe loop's cache: {size}")
    print(
        f"preparing a run: {without * 1000:.0f} ms without it, {with_cache * 1000:.0f} ms with it copied in"
    )


if __name__ == "__main__":
    main()
