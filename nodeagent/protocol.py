"""What a node's agent and the service's Ray executor say to each other, as msgpack-encoded Structs.

Everything crosses Ray as bytes: an agent's failure is a `Failed` value, never a raised exception
(a `SandboxError` pickled through Ray would lose its reason), and the run's events (output as it
arrives, the workload's end, the result) are one tagged union that `decode_event` turns back.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from sandbox import RunResult, RunSpec, SandboxError, SpecError, Timings

__all__ = [
    "LABEL_NODE",
    "AgentInfo",
    "Event",
    "Exited",
    "Failed",
    "Finished",
    "NodeFacts",
    "Output",
    "Prepared",
    "decode_event",
    "decode_facts",
    "decode_prepared",
    "decode_spec",
    "encode",
]

LABEL_NODE = "ratchet.node"  # on every container an agent makes: each agent sweeps only its own node


class AgentInfo(msgspec.Struct, kw_only=True, frozen=True):
    node: str  # the node's stable name (its containers carry it)
    node_id: str  # Ray's id of the node: new each time the node starts
    gpus: list[str]  # device ids of the node's GPUs, held by the agent for Ratchet's runs
    engine: bool  # the node's container engine answers
    pid: int
    auth: str = ""  # Ray's authentication mode on the node ("token", "disabled")


class NodeFacts(msgspec.Struct, kw_only=True, frozen=True):
    """What a node's engine says about itself, for `ratchet doctor`."""

    engine: bool  # the node's container engine answers
    engine_version: str = ""
    runtimes: list[str] = []  # OCI runtimes registered with it (runc, runsc, ...)
    gpu_route: str = "none"  # how its containers get GPUs: "nvidia", "cdi" or "none"
    gpu_reason: str = ""  # why that route; for "none", what to install
    missing_images: list[str] = []  # of the images asked about, those it lacks
    problem: str | None = None  # why the engine could not be asked


class Prepared(msgspec.Struct, kw_only=True, frozen=True, tag="prepared"):
    container_id: str
    run_id: str
    timings: Timings


class Failed(msgspec.Struct, kw_only=True, frozen=True, tag="failed"):
    message: str
    kind: Literal["spec", "engine", "agent"] = "engine"
    reason: str = "refused"  # SandboxError.reason for kind "engine"

    @classmethod
    def of(cls, exc: BaseException) -> Failed:
        if isinstance(exc, SpecError):
            return cls(message=str(exc), kind="spec")
        if isinstance(exc, SandboxError):
            return cls(message=str(exc), reason=exc.reason)
        return cls(message=f"{type(exc).__name__}: {exc}", kind="agent")

    def error(self, node: str) -> Exception:
        if self.kind == "spec":
            return SpecError(self.message)
        return SandboxError(f"node {node}: {self.message}", self.reason)


class Output(msgspec.Struct, kw_only=True, frozen=True, tag="output"):
    data: bytes


class Exited(msgspec.Struct, kw_only=True, frozen=True, tag="exited"):
    timings: Timings


class Finished(msgspec.Struct, kw_only=True, frozen=True, tag="finished"):
    result: RunResult


Event = Output | Exited | Finished | Failed

_encoder = msgspec.msgpack.Encoder()
_events = msgspec.msgpack.Decoder(Event)
_prepare_answer = msgspec.msgpack.Decoder(Prepared | Failed)
_specs = msgspec.msgpack.Decoder(RunSpec)
_facts = msgspec.msgpack.Decoder(NodeFacts)


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def decode_event(data: bytes) -> Event:
    return _events.decode(data)


def decode_prepared(data: bytes) -> Prepared | Failed:
    return _prepare_answer.decode(data)


def decode_spec(data: bytes) -> RunSpec:
    return _specs.decode(data)


def decode_facts(data: bytes) -> NodeFacts:
    return _facts.decode(data)
