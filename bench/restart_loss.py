"""GPU time a restart throws away: a real `ratchet serve` killed with SIGKILL while every slot runs
an experiment, started again on the same data dir, against the same experiments with no restart.

    .venv/bin/python bench/restart_loss.py [--slots 3] [--hold 20] [--kill-at 8] [--down 2]

Three phases on fresh services, each with `--slots` candidates whose workload holds its slot for
`--hold` seconds (standing in for training): no restart (the baseline); kill -9 `--kill-at` seconds
into the runs and start again `--down` seconds later with `RATCHET_REATTACH=false` (what a restart
did before: every run removed and run again); the same with reattach on (the runs are taken over).

Slot-seconds thrown away: for every container of an attempt that did not produce its experiment's
result, from its start to its death, as the engine reports them (`docker events`; a container
starts behind its gate a fraction of a second before its workload, and keeps running while the
service is down). That is GPU time on a GPU host. Wall time: from the submission to the last
verdict; `extra` is that minus the baseline's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import docker
import httpx
from harness import ROOT, Service, workload

__all__ = ["main"]


class Restartable(Service):
    """A `Service` that can be killed with SIGKILL and started again on its data dir and port."""

    def __init__(self, slots: int, env: dict[str, str]) -> None:
        self.slots, self.extra_env = slots, env
        super().__init__(slots, env)

    def kill_9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def start_again(self) -> None:
        env = {**os.environ, "RATCHET_INSTANCE": self.instance, "RATCHET_LOG_LEVEL": "info", **self.extra_env}
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        argv += ["--data-dir", str(self.data_dir), "--slots", str(self.slots)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"service did not come back:\n{self.log()[-3000:]}")


class Lifetimes:
    """Start and death of every container of one instance, from the engine's event stream."""

    def __init__(self, instance: str) -> None:
        self.start: dict[str, tuple[float, str, int]] = {}  # container -> (when, experiment, attempt)
        self.die: dict[str, float] = {}
        events = docker.from_env().events(
            decode=True, filters={"type": "container", "label": f"ratchet.sandbox={instance}"}
        )
        threading.Thread(target=self._pump, args=(events,), daemon=True).start()

    def _pump(self, events) -> None:
        for ev in events:
            attrs, when = ev["Actor"]["Attributes"], ev["timeNano"] / 1e9
            if ev["Action"] == "start" and "ratchet.experiment" in attrs:
                self.start[ev["id"]] = (when, attrs["ratchet.experiment"], int(attrs["ratchet.attempt"]))
            elif ev["Action"] == "die":
                self.die.setdefault(ev["id"], when)

    def thrown_away(self, attempts: dict[str, int]) -> float:
        """Seconds of containers whose attempt is not the one that decided its experiment."""
        time.sleep(1.0)  # the last events on their way
        lost = 0.0
        for cid, (began, exp_id, attempt) in self.start.items():
            if exp_id in attempts and attempt < attempts[exp_id]:
                lost += self.die.get(cid, time.time()) - began
        return lost


def phase(slots: int, hold: float, restart: bool, reattach: bool, kill_at: float, down: float) -> dict:
    env = {"RATCHET_REATTACH": "true" if reattach else "false", "RATCHET_PREPARE_AHEAD": "0"}
    service = Restartable(slots, env)
    try:
        lifetimes = Lifetimes(service.instance)
        loop_id = service.create_loop("restart", "runc", hold, timeout_s=hold * 3)
        began = time.monotonic()
        ids = service.submit(loop_id, hold, slots)
        if restart:
            deadline = time.monotonic() + 60
            while service.client.get(f"/v1/loops/{loop_id}").json()["counts"]["running"] < slots:
                if time.monotonic() > deadline:
                    raise RuntimeError("the experiments never all ran")
                time.sleep(0.05)
            time.sleep(kill_at)
            service.kill_9()
            time.sleep(down)
            service.start_again()
        service.wait_idle(loop_id)
        wall = time.monotonic() - began
        exps = service.experiments(ids)
        attempts = {e["id"]: e["attempts"] for e in exps}
        return {
            "runs": len(exps),
            "attempts": sum(attempts.values()),
            "lost": lifetimes.thrown_away(attempts),
            "wall": wall,
            "workload": max(e["workload_seconds"] for e in exps),
        }
    finally:
        service.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=3, help="slots, each running one experiment at the kill")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds each workload holds its slot")
    ap.add_argument("--kill-at", type=float, default=8.0, help="seconds into the runs when the service dies")
    ap.add_argument("--down", type=float, default=2.0, help="seconds before it is started again")
    args = ap.parse_args()
    hold = workload(args.hold, "x").splitlines()[1]
    print(
        f"{args.slots} slots, each running a {args.hold:g} s workload (`{hold}` in sh train.sh);"
        f" kill -9 at {args.kill_at:g} s, started again {args.down:g} s later"
    )
    print(
        f"{'phase':<28}{'runs':>5}{'attempts':>9}{'slot-s thrown away':>19}{'per restart':>12}"
        f"{'longest run s':>14}{'wall s':>8}{'extra s':>8}"
    )
    base = None
    for name, restart, reattach in (
        ("no restart (baseline)", False, True),
        ("restart, reattach off", True, False),
        ("restart, reattach on", True, True),
    ):
        r = phase(args.slots, args.hold, restart, reattach, args.kill_at, args.down)
        base = r["wall"] if base is None else base
        per = f"{r['lost']:.1f}" if restart else "-"
        print(
            f"{name:<28}{r['runs']:>5}{r['attempts']:>9}{r['lost']:>19.1f}{per:>12}"
            f"{r['workload']:>14.1f}{r['wall']:>8.1f}{r['wall'] - base:>+8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
