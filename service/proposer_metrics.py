"""Prometheus metrics of proposers and duplicates (same rules as `metrics`: the `loop` label is the
loop's name, every other label comes from a small fixed set). Served on the same `/metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .proposal_models import ProposalStatus
from .rules.proposals import REFUSAL_CODES

__all__ = [
    "DUPLICATES",
    "LLM_REQUESTS",
    "LLM_TOKENS",
    "PROPOSALS",
    "PROPOSALS_RUNNING",
    "PROPOSAL_DURATION",
    "PROPOSER_FAILURES",
    "PROPOSER_FAILURE_REASONS",
    "track_proposer",
]

PROPOSER_FAILURE_REASONS = (*REFUSAL_CODES, "engine", "internal")
LLM_OUTCOMES = ("ok", "retried", "refused")
FINAL = tuple(s.value for s in ProposalStatus if s not in (ProposalStatus.queued, ProposalStatus.running))

PROPOSALS = Counter(
    "ratchet_proposals",
    "Proposer runs finished, by proposer kind and final status",
    ["loop", "kind", "status"],
)
PROPOSER_FAILURES = Counter(
    "ratchet_proposer_failures",
    "Proposals that made no new candidate, by cause (failed, duplicate or error)",
    ["loop", "reason"],
)
PROPOSALS_RUNNING = Gauge("ratchet_proposals_running", "Proposer runs in progress")
PROPOSAL_DURATION = Histogram(
    "ratchet_proposal_duration_seconds",
    "Wall time of one proposer run, from its start to its candidate (or failure)",
    ["loop"],
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
LLM_REQUESTS = Counter(
    "ratchet_llm_requests",
    "Chat API requests of llm proposers: ok, retried (429, 5xx, dropped) or refused (other 4xx)",
    ["loop", "outcome"],
)
LLM_TOKENS = Counter("ratchet_llm_tokens", "Tokens the chat API reported used by llm proposers", ["loop"])
DUPLICATES = Counter(
    "ratchet_duplicates",
    "Candidates answered with the earlier experiment that ran the same snapshot (not run again)",
    ["loop", "source"],
)

_tracked: set[tuple[str, str]] = set()


def track_proposer(loop: str, kind: str) -> None:
    """The loop's proposer series at zero (idempotent)."""
    if (loop, kind) in _tracked:
        return
    _tracked.add((loop, kind))
    for status in FINAL:
        PROPOSALS.labels(loop=loop, kind=kind, status=status)
    for reason in PROPOSER_FAILURE_REASONS:
        PROPOSER_FAILURES.labels(loop=loop, reason=reason)
    PROPOSAL_DURATION.labels(loop=loop)
    for source in ("api", "proposer"):
        DUPLICATES.labels(loop=loop, source=source)
    if kind == "llm":
        for outcome in LLM_OUTCOMES:
            LLM_REQUESTS.labels(loop=loop, outcome=outcome)
        LLM_TOKENS.labels(loop=loop)
