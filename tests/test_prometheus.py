"""The Grafana dashboard against a real Prometheus server scraping a real service.

Prometheus (Debian's `prometheus` package) is started by the test with its own config and storage,
scrapes the service every second while a loop runs experiments of every kind, and then every
PromQL expression of deploy/grafana/dashboards/ratchet.json is evaluated through Prometheus' HTTP
API. A dashboard query that returns nothing (or nothing but NaN) fails the test."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ROOT, Server, free_port
from test_api import TRAIN, make_loop

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ratchet.json"
DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "ratchet.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "compose.yaml"

# What Grafana would put in for its variables; the windows are wide enough to cover the whole test.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m", "$window": "5m"}
LOOP = "prom"


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        why = f"`{binary}` not found: install Debian's prometheus package (scripts/setup.sh does)"
        # CI (scripts/test.sh) sets this: there a missing tool is a failure, not a skip.
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ratchet", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited early:\n{self.log()}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready in {timeout} s:\n{self.log()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def prom_server(server_factory) -> Server:
    # A small log cap, so one noisy candidate shows up as a truncated log.
    return server_factory(slots=2, env={"RATCHET_LOG_BYTES": "4096"})


@pytest.fixture
def prometheus(prom_server: Server, tmp_path: Path) -> Iterator[Prometheus]:
    prom = Prometheus(_require("prometheus"), tmp_path / "prometheus", f"127.0.0.1:{prom_server.port}")
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query target in the dashboard, rows included."""

    def walk(panels: list[dict]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def substitute(expr: str, loop: str) -> str:
    for var, value in {"$loop": loop, **SUBSTITUTIONS}.items():
        expr = expr.replace(var, value)
    left = re.findall(r"\$\{?\w+", expr)
    assert not left, f"unknown dashboard variables {left} in {expr}"
    return expr


def _edit(value: str) -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}")}


CANDIDATES = {
    "keep": _edit("0.5"),
    "discard": _edit("2.0"),
    "crash": {"train.py": "raise SystemExit(3)\n"},
    "oom": {"train.py": "b = bytearray(512 * 1024 * 1024)\n" + TRAIN},
    "noisy": {"train.py": "print('x' * 20000)\n" + TRAIN.replace("V = 1.0", "V = 3.0")},
    "slow": {"train.py": TRAIN.replace("SLEEP = 0.0", "SLEEP = 60.0")},
}


def run_loop(srv: Server) -> dict[str, dict]:
    """Baseline, then a candidate of every outcome; `slow` runs into the hard timeout, `cancel` is
    cancelled while it runs."""
    loop = make_loop(srv, name=LOOP, time_budget_s=1, timeout_s=4)
    srv.wait_idle(loop["id"])
    lid = loop["id"]
    cancel = srv.client.post(
        f"/v1/loops/{lid}/experiments",
        json={"description": "cancel", "files": {"train.py": CANDIDATES["slow"]["train.py"] + "# c\n"}},
    ).json()
    exps = {}
    for name, files in CANDIDATES.items():
        r = srv.client.post(f"/v1/loops/{lid}/experiments", json={"description": name, "files": files})
        assert r.status_code == 202, r.text
        exps[name] = r.json()
    deadline = time.monotonic() + 30
    while srv.client.get(f"/v1/experiments/{cancel['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the cancel candidate never started"
        time.sleep(0.1)
    time.sleep(0.5)
    assert srv.client.post(f"/v1/experiments/{cancel['id']}/cancel").status_code == 200
    srv.wait_idle(lid, timeout=60)
    final = {name: srv.wait_final(e["id"]) for name, e in exps.items()}
    final["cancel"] = srv.wait_final(cancel["id"])
    return final


def wait_for(check, timeout: float = 20.0) -> None:
    """Prometheus sees a change one scrape (1 s) later at the earliest; retry until it has."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


EXPECTED_STATUSES = {
    "keep": "keep",
    "discard": "discard",
    "crash": "crash",
    "oom": "crash",
    "noisy": "discard",
    "slow": "timeout",
    "cancel": "cancelled",
}


def _by(prom: Prometheus, label: str, expr: str) -> dict[str, float]:
    return {r["metric"][label]: float(r["value"][1]) for r in prom.query(expr)}


def check_target_up(prom: Prometheus) -> None:
    targets = prom.client.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    assert prom.value('up{job="ratchet"}') == 1.0


def check_what_happened(prom: Prometheus) -> None:
    """Prometheus saw exactly the outcomes of `run_loop`, each under its own label value."""
    sel = f'loop="{LOOP}"'
    statuses = _by(prom, "status", f"ratchet_experiments_total{{{sel}}}")
    assert statuses == {
        "keep": 2,
        "discard": 2,
        "crash": 2,
        "timeout": 1,
        "cancelled": 1,
        "error": 0,
        "measured": 0,
    }
    failures = _by(prom, "reason", f"ratchet_experiment_failures_total{{{sel}}} > 0")
    assert failures == {"exit_nonzero": 1, "oom": 1, "timeout": 1}, failures
    kills = _by(prom, "reason", "ratchet_sandbox_kills_total")
    assert kills == {"timeout": 1, "oom": 1, "cancel": 1}, kills
    assert prom.value("ratchet_log_truncated_total") == 1
    assert prom.value(f'ratchet_loop_best_metric{{{sel},metric="val_bpb"}}') == 0.5
    assert prom.value(f"ratchet_loop_time_to_first_result_seconds_count{{{sel}}}") == 1
    assert prom.value(f"ratchet_experiment_queue_seconds_count{{{sel}}}") == 8
    assert prom.value("ratchet_experiments_running") == 0
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", prom.query("ratchet_build_info")[0]["metric"]["version"])


def check_dashboard(prom: Prometheus, exprs: list[tuple[str, str]]) -> None:
    """Every query, for the one loop and for All, has at least one series with a real number."""
    empty = []
    for loop in (LOOP, ".*"):
        for title, expr in exprs:
            query = substitute(expr, loop)
            values = [float(r["value"][1]) for r in prom.query(query)]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {query} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_dashboard_query_returns_data(prom_server: Server, prometheus: Prometheus):
    wait_for(lambda: check_target_up(prometheus))  # as deployed: watching before the loop starts
    statuses = {name: e["status"] for name, e in run_loop(prom_server).items()}
    assert statuses == EXPECTED_STATUSES
    wait_for(lambda: check_what_happened(prometheus))
    # the dashboard's $loop variable: label_values(ratchet_experiments_total, loop)
    r = prometheus.client.get("/api/v1/label/loop/values", params={"match[]": "ratchet_experiments_total"})
    assert LOOP in r.json()["data"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 20, exprs
    wait_for(lambda: check_dashboard(prometheus, exprs))
    check_target_up(prometheus)


def test_dashboard_and_provisioning_fit_together():
    """What Grafana needs to show the dashboard with no clicking: the datasource uid the panels
    name is the provisioned one, the provider path is where compose mounts the dashboards, and
    the home dashboard path points at the file."""
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    provider = yaml.safe_load(PROVIDER.read_text())["providers"][0]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]

    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    uids = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        uids.add(panel["datasource"]["uid"])
        uids.update(t["datasource"]["uid"] for t in panel["targets"])
    assert uids == {datasource["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["loop"]["query"] == "label_values(ratchet_experiments_total, loop)"
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "ratchet"

    grafana = compose["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/ratchet.json"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    prom_mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"] if v.startswith("./"))
    assert prom_mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_compose_scrape_config_is_valid():
    promtool = _require("promtool")
    r = subprocess.run([promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    job = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["ratchet:8080"] and job["scrape_interval"] == "5s"
