"""Which Ray nodes run experiments and the slots they give, and the Ray settings `ratchet serve`
refuses: no cluster needed."""

from __future__ import annotations

import os

from click.testing import CliRunner

from service.cli import cli
from service.runs.ray.inventory import NODE_LABEL, nodes_from_ray, slots_of
from service.runs.ray.loopback import is_loopback


def _node(node_id: str, name: str | None, alive: bool = True, **resources: float) -> dict:
    labels = {NODE_LABEL: name} if name else {}
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerHostname": f"host-{node_id}",
        "Resources": resources,
        "Labels": labels,
    }


def test_only_live_nodes_with_cpus_take_part_by_name() -> None:
    raw = [
        _node("h", None, **{"node:__internal_head__": 1}),  # a head with --num-cpus=0
        _node("b", "w2", CPU=4, GPU=2),
        _node("a", "w1", CPU=1),
        _node("d", "w3", alive=False, CPU=8),
        _node("e", None, CPU=2),  # no label: its host name
    ]
    nodes = nodes_from_ray(raw)
    assert [(n.name, n.cpus, n.gpus) for n in nodes] == [("host-e", 2, 0), ("w1", 1, 0), ("w2", 4, 2)]
    assert [n.name for n in nodes_from_ray(raw, only={"w2"})] == ["w2"]


def test_slots_are_gpu_groups_or_cpu_slots() -> None:
    assert slots_of(["0", "1", "2"], gpus_per_slot=2, cpu_slots=3) == 1  # the odd GPU out: none
    assert slots_of(["0", "1"], 1, 3) == 2
    assert slots_of([], gpus_per_slot=1, cpu_slots=2) == 2
    assert slots_of([], 1, 0) == 0


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("192.0.2.2", "10.0.0.1", "example.org", ""))


def test_serve_refuses_a_ray_executor_set_up_wrong(monkeypatch, tmp_path) -> None:
    for key in [k for k in os.environ if k.startswith("RATCHET_")]:
        monkeypatch.delenv(key)
    runner = CliRunner()
    serve = ["serve", "--executor", "ray", "--data-dir", str(tmp_path)]
    out = runner.invoke(cli, serve)
    assert out.exit_code == 2 and "--executor ray needs --ray-address" in out.output
    out = runner.invoke(cli, [*serve, "--ray-address", "127.0.0.1:1", "--slots", "4"])
    assert out.exit_code == 2 and "--slots and --gpus are the local engine's" in out.output
    monkeypatch.setenv("RATCHET_RAY_AUTH", "maybe")
    out = runner.invoke(cli, [*serve, "--ray-address", "127.0.0.1:1"])
    assert out.exit_code == 2 and "ray_auth" in out.output
