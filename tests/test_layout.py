"""The architecture, checked from the source: which package may import which, the one door to the
container engine, pure rules free of I/O, and modules and classes small enough to read.

`nodeagent` runs on the nodes of a Ray cluster, not in the service: like `sandbox` it knows no
loops, and it holds the node's `Sandbox`. The service reaches it only from the Ray executor's
package, and imports its actor class in one module, to hand it to Ray (it is only ever made on
a node)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("sandbox", "nodeagent", "service", "client")
# service's layers, lowest first: each may import only those below it (and the shared modules).
LAYERS = ("rules", "state", "runs", "http")
SHARED = {"service.models", "service.settings", "service.metrics", "service.faults"}
IO_MODULES = {"os", "subprocess", "socket", "sqlite3", "aiosqlite", "asyncio", "time", "shutil", "pathlib"}
ENGINE_DOOR = "service/runs/local.py"
RAY_EXECUTOR = "service/runs/ray/"  # the only service package that talks to the node agents
AGENT_PLACER = "service/runs/ray/agents.py"  # the one module that hands the actor class to Ray


def sources() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module and name imported by `path`, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "service" and parts[1] in LAYERS else None


@pytest.mark.parametrize("path", list(sources()), ids=rel)
def test_imports_respect_the_layers(path: Path) -> None:
    names = imports(path)
    here = rel(path)
    if here.startswith(("sandbox/", "nodeagent/")):
        assert not {n for n in names if n.split(".")[0] in ("service", "client")}, f"{here} knows no loops"
    if here.startswith("sandbox/"):
        assert not {n for n in names if n.split(".")[0] == "nodeagent"}, "sandbox runs below the agent"
    if here.startswith("client/"):
        server = {n for n in names if n.split(".")[0] == "service" and not n.startswith("service.models")}
        assert not server, f"the client imports server modules: {server}"
    mine = layer_of(module_name(path))
    if mine is not None:
        above = {n for n in names if (other := layer_of(n)) and LAYERS.index(other) > LAYERS.index(mine)}
        assert not above, f"{here} ({mine}) imports a layer above it: {above}"
    if mine == "rules":
        io = {n for n in names if n in IO_MODULES or n.split(".")[0] in IO_MODULES}
        assert not io, f"pure rules do no I/O, yet {here} imports {io}"


@pytest.mark.parametrize("path", list(sources()), ids=rel)
def test_only_the_local_executor_reaches_the_engine(path: Path) -> None:
    names = imports(path)
    here = rel(path)
    if here.startswith("service/"):
        assert not {n for n in names if n.split(".")[0] == "docker"}, f"{here} imports docker"
        engine = {
            n
            for n in names
            if n in ("sandbox.Sandbox", "sandbox.PreparedRun") or n.startswith("sandbox.runner")
        }
        assert not engine or here == ENGINE_DOOR, f"{here} reaches the engine around the executor: {engine}"


@pytest.mark.parametrize("path", list(sources()), ids=rel)
def test_only_the_ray_executor_talks_to_the_node_agents(path: Path) -> None:
    here = rel(path)
    if not here.startswith(("service/", "client/")):
        return
    agent = {n for n in imports(path) if n.split(".")[0] == "nodeagent"}
    assert not agent or here.startswith(RAY_EXECUTOR), f"{here} reaches the node agents: {agent}"
    actor = {n for n in agent if n.startswith("nodeagent.agent")}
    assert not actor or here == AGENT_PLACER, f"{here} imports the agent's actor: {actor}"


@pytest.mark.parametrize("path", list(sources()), ids=rel)
def test_modules_and_classes_stay_small(path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= 500, f"{rel(path)} has {text.count(chr(10))} lines (at most 500)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= 400, f"class {node.name} of {rel(path)} has {size} lines (at most 400)"
