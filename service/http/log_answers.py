"""How a run's log is answered, for experiments and proposer runs alike: plain text, or with
`?follow=true` server-sent events, and an OpenAPI description of both."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import Parameter

from .common import errors
from .follow import live_text
from .services import Services

__all__ = ["LOG_RESPONSES", "Follow", "LogsOperation", "live_tail", "log_response"]

Follow = Annotated[bool, Parameter(description="stream as server-sent events until it ends")]

LOG_RESPONSES: dict[int, Any] = {
    200: ResponseSpec(
        data_container=str,
        media_type="text/plain",
        description="the log; with follow=true a text/event-stream instead",
        generate_examples=False,
    ),
    **errors(404),
}


def live_tail(services: Services, run_id: str, running: bool) -> str | None:
    """The newest output of a run still going, as a view's `log_tail`; None once it is over."""
    live = services.logs.live(run_id) if running else None
    return None if live is None else live_text(live, services.settings.log_tail_bytes, mark_gap=False)


def log_response(data: bytes, status: str) -> Response[bytes]:
    """The stored (or live) log as text; `X-Ratchet-Status` says whether more may come."""
    return Response(data, media_type="text/plain; charset=utf-8", headers={"X-Ratchet-Status": status})


class LogsOperation(Operation):
    """The log answers as plain text, or with ?follow=true as an event stream: document both."""

    def to_schema(self) -> dict[str, object]:
        schema = super().to_schema()
        # One event's shape as the stream's schema: what SSE-aware tools (schemathesis, among
        # others) validate each event against under OpenAPI 3.1, which has no `itemSchema` (3.2).
        event = {
            "type": "object",
            "description": "one server-sent event: `data` events carry output as it is printed;"
            " `event: end` carries the final status and closes the stream",
            "properties": {
                "event": {"type": "string", "enum": ["message", "end"]},
                "data": {"type": "string", "description": "output, or the final status for `end`"},
            },
            "required": ["data"],
        }
        schema["responses"]["200"]["content"]["text/event-stream"] = {
            "schema": event,
            "example": "data: step 1 loss 3.21\n\nevent: end\ndata: keep\n\n",
        }
        return schema
