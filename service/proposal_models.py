"""The schema of proposers: what a loop's body says about who proposes its candidates, and what the
API shows of each proposal. Part of the one schema (`models` re-exports and uses it); kept apart
because it is a feature of its own.

A loop without `proposer` waits for candidates over REST (v1). With one, Ratchet keeps proposing:

- `command`: an agent CLI or script in a sandbox of its own, on a writable copy of the parent
  workspace; its edits of editable files become the candidate.
- `search`: a built-in random local search over declared numeric assignments (`NAME = value`).
- `llm`: a minimal agent over an OpenAI-compatible chat API, run by the service.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "CommandProposer",
    "Knob",
    "LlmProposer",
    "ProposalPage",
    "ProposalStatus",
    "ProposalView",
    "ProposerNetwork",
    "ProposerResources",
    "ProposerSpec",
    "ProposerView",
    "SearchProposer",
]

_Arg = Annotated[str, Meta(min_length=1, max_length=4096)]
_EnvKey = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
_Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]
_Endpoint = Annotated[str, Meta(min_length=3, max_length=300, pattern=r"^[^\s/]+:[0-9]{1,5}$")]
_Path = Annotated[str, Meta(min_length=1, max_length=1024)]
_Parallel = Annotated[int, Meta(ge=1, le=64)]
_Failures = Annotated[int, Meta(ge=1, le=1000)]
# The workspace each proposal starts from: the loop's best when it starts, or always its baseline
# (independent edits of the original, each judged against the best so far).
StartFrom = Literal["best", "baseline"]
_Knob = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
_Choice = int | float | str | bool


class ProposerNetwork(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Egress for a command proposer: exactly these `host:port` endpoints, through Ratchet's
    allow-listing proxy, and nothing else (absent: no network at all)."""

    allow: Annotated[list[_Endpoint], Meta(min_length=1, max_length=64)]


class ProposerResources(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Limits of a command proposer's container. It never gets a GPU or an experiment slot."""

    cpus: Annotated[float, Meta(gt=0, le=1024)] = 1.0
    memory_mb: Annotated[int, Meta(ge=64, le=4 * 1024 * 1024)] = 1024
    pids: Annotated[int, Meta(ge=16, le=1_000_000)] = 256
    disk_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 512


class CommandProposer(
    msgspec.Struct, tag_field="kind", tag="command", kw_only=True, frozen=True, forbid_unknown_fields=True
):
    """An agent CLI or script that edits a writable copy of the parent workspace in its own sandbox.
    Context (program.md, the ledger, recent experiments) is read-only in `$RATCHET_CONTEXT_DIR`; the
    first line of `$RATCHET_OUTPUT_DIR/description.txt` describes the candidate."""

    command: Annotated[list[_Arg], Meta(min_length=1, max_length=256)]
    image: Annotated[str, Meta(min_length=1, max_length=512)] | None = None  # default: the loop's
    timeout_s: _Seconds = 600.0  # hard kill of one proposer run
    env: dict[_EnvKey, Annotated[str, Meta(max_length=4096)]] = {}
    resources: ProposerResources = ProposerResources()
    network: ProposerNetwork | None = None  # default: no network at all
    parallel: _Parallel = 1  # proposals at once, when that many slots are free
    start_from: StartFrom = "best"
    max_failures: _Failures = 5  # consecutive failed proposals pause the loop
    context_experiments: Annotated[int, Meta(ge=0, le=1000)] = 20  # recent experiments shown


class Knob(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One tunable assignment `NAME = value`: a range (`min`, `max`; `log` scale; `integer` rounds) or
    a list of `choices`."""

    min: float | None = None
    max: float | None = None
    log: bool = False
    integer: bool = False
    choices: Annotated[list[_Choice], Meta(min_length=2, max_length=256)] | None = None


class SearchProposer(
    msgspec.Struct, tag_field="kind", tag="search", kw_only=True, frozen=True, forbid_unknown_fields=True
):
    """Random local search, built in: each proposal changes one or two knobs of the current best
    by a step of `step` (a fraction of the knob's range, in its scale), from a seeded generator, so
    the same loop proposes the same candidates."""

    file: _Path = "train.py"  # an editable file holding the assignments
    knobs: Annotated[dict[_Knob, Knob], Meta(min_length=1, max_length=64)]
    seed: int = 0
    step: Annotated[float, Meta(gt=0, le=1)] = 0.25
    parallel: _Parallel = 1
    start_from: StartFrom = "best"
    max_failures: _Failures = 20  # a run of duplicates means the neighbourhood is exhausted


class LlmProposer(
    msgspec.Struct, tag_field="kind", tag="llm", kw_only=True, frozen=True, forbid_unknown_fields=True
):
    """A minimal agent over an OpenAI-compatible chat API (`POST {base_url}/chat/completions`),
    run by the service. The key is the service's environment variable `api_key_env`: it never
    appears in a loop body or any answer."""

    base_url: Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"^https?://")]
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    api_key_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.7
    max_tokens: Annotated[int, Meta(ge=16, le=1_000_000)] = 4096  # per reply
    max_requests: Annotated[int, Meta(ge=1)] | None = None  # budget of the loop, all proposals
    max_total_tokens: Annotated[int, Meta(ge=1)] | None = None  # budget of the loop (usage reported)
    timeout_s: _Seconds = 120.0  # per request
    retries: Annotated[int, Meta(ge=0, le=10)] = 4  # on 429, 5xx and dropped connections
    context_experiments: Annotated[int, Meta(ge=0, le=200)] = 20
    log_tail_bytes: Annotated[int, Meta(ge=0, le=65536)] = 2000  # of each recent crash
    parallel: _Parallel = 1
    start_from: StartFrom = "best"
    max_failures: _Failures = 5


ProposerSpec = CommandProposer | SearchProposer | LlmProposer


class ProposalStatus(StrEnum):
    """A proposer run. Every change goes through `service.state.proposals`."""

    queued = "queued"  # to be run (again, after a restart cut it short)
    running = "running"  # the proposer is working on it
    proposed = "proposed"  # its candidate was queued as `experiment_id`
    duplicate = "duplicate"  # its candidate had already run in this loop: `duplicate_of`
    failed = "failed"  # the proposer failed (exit, timeout, harness edit, no change, ...): `reason`
    error = "error"  # the infrastructure failed, not the proposer
    cancelled = "cancelled"  # cancelled, or its loop stopped, filled up or passed its deadline


PROPOSAL_OVER = frozenset(
    {
        ProposalStatus.proposed,
        ProposalStatus.duplicate,
        ProposalStatus.failed,
        ProposalStatus.error,
        ProposalStatus.cancelled,
    }
)


class ProposalView(msgspec.Struct, kw_only=True):
    id: str
    loop_id: str
    number: int  # 1 for the loop's first proposal
    kind: str
    status: ProposalStatus
    reason: str | None = None
    parent: str | None = None  # the snapshot it started from
    description: str | None = None
    experiment_id: str | None = None  # the candidate it made
    duplicate_of: str | None = None  # the earlier experiment its candidate repeated
    exit_code: int | None = None
    attempts: int = 0  # times it was started (>1 after a restart)
    requests: int = 0  # chat requests (llm)
    tokens: int = 0  # tokens reported used (llm)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    log_tail: str | None = None


class ProposalPage(msgspec.Struct, kw_only=True):
    items: list[ProposalView]
    next_after: int | None = None  # pass as ?after= for the next page; null on the last page


class ProposerView(msgspec.Struct, kw_only=True):
    """What a loop's proposer is doing: shown with the loop."""

    kind: str
    counts: dict[str, int] = {}  # proposals per status
    failure_streak: int = 0  # consecutive failed proposals (max_failures pauses the loop)
    requests: int = 0  # chat requests so far (llm)
    tokens: int = 0  # tokens reported so far (llm)
    idle_reason: str | None = None  # why it proposes nothing now, when it does not
