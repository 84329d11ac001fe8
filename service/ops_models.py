"""The schema of the operator's features (service info, webhooks): API bodies and views, in the
same msgspec Structs as `models`, kept apart so the experiment schema stays readable."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = [
    "DeliveryPage",
    "DeliveryState",
    "DeliveryView",
    "ServiceInfo",
    "WebhookEvent",
    "WebhookSpec",
    "WebhookView",
]


class ServiceInfo(msgspec.Struct, kw_only=True):
    version: str
    data_dir: str  # absolute, as the service sees it (inside its container, if it runs in one)
    auth: str  # "none" or "tokens"
    started_at: float


class WebhookEvent(StrEnum):
    """What a webhook can be told."""

    keep = "keep"  # an experiment was kept: a new best (the baseline's success too)
    crash_streak = "crash_streak"  # `streak` results in a row were crash or timeout
    timeout_streak = "timeout_streak"  # `streak` results in a row were timeouts
    loop_finished = "loop_finished"  # stopped, or max_experiments reached with nothing left to run
    loop_paused = "loop_paused"  # paused
    proposer_failed = "proposer_failed"  # the loop's proposer failed to make a candidate


class WebhookSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A webhook of a loop (in the loop body's `webhooks`, or added later). `secret` signs the
    deliveries (HMAC-SHA256); without one a random secret is kept and never shown, which suits
    receivers that check nothing (a Slack incoming webhook)."""

    url: Annotated[str, Meta(min_length=8, max_length=2048)]  # http:// or https://
    secret: Annotated[str, Meta(min_length=16, max_length=256)] | None = None
    events: Annotated[list[WebhookEvent], Meta(min_length=1, max_length=16)] = msgspec.field(
        default_factory=lambda: list(WebhookEvent)
    )
    streak: Annotated[int, Meta(ge=1, le=1000)] = 3  # results in a row that make a crash/timeout streak


class DeliveryState(StrEnum):
    pending = "pending"  # waiting for its next attempt (the first, or a retry after a failure)
    delivered = "delivered"  # the receiver answered 2xx
    failed = "failed"  # given up: out of attempts, refused by the receiver (4xx) or by the policy


class WebhookView(msgspec.Struct, kw_only=True):
    """A webhook as anyone may see it: where it goes without the path or query (which may hold a
    token, as a Slack URL does), never its secret."""

    id: str
    loop_id: str | None  # None: the service-wide webhook of RATCHET_WEBHOOK_URL
    target: str  # scheme://host[:port]
    events: list[WebhookEvent]
    streak: int
    created_at: float
    pending: int = 0
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None  # of the newest failed attempt, if any
    last_error_at: float | None = None


class DeliveryView(msgspec.Struct, kw_only=True):
    id: str
    webhook_id: str
    loop_id: str | None
    event: WebhookEvent
    state: DeliveryState
    text: str  # the message's `text` field
    attempts: int
    next_attempt_at: float | None = None  # pending only
    last_status: int | None = None  # the receiver's HTTP status of the last attempt
    last_error: str | None = None
    created_at: float
    finished_at: float | None = None


class DeliveryPage(msgspec.Struct, kw_only=True):
    items: list[DeliveryView]  # newest first
    next_before: float | None = None  # pass as ?before= for older ones; null on the last page
