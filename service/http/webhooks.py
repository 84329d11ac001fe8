"""`/v1/webhooks`: the webhooks of loops and of the service, and the state of their deliveries
(never a secret, never a URL's path or query)."""

from __future__ import annotations

import html
import time
from typing import Annotated
from urllib.parse import urlsplit

from litestar import Controller, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from ..ops_models import (
    DeliveryPage,
    DeliveryState,
    DeliveryView,
    WebhookEvent,
    WebhookSpec,
    WebhookView,
)
from ..rules.patches import CandidateError
from ..rules.webhooks import address_problem, host_problem, literal_address, parse_allow, url_problem
from ..settings import Settings
from ..state import enqueue, webhooks
from .common import LoopId, errors, loop_or_404
from .services import Services

__all__ = ["WebhookController", "check_webhooks", "tell_webhooks", "webhook_notice"]

Id = Annotated[str, Parameter(pattern=r"^([0-9a-f]{16}|service)$", description="webhook id")]
DeliveryId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$", description="delivery id")]


def check_webhooks(specs: list[WebhookSpec], settings: Settings) -> None:
    """422 for a webhook that could never be delivered: a bad URL, or an address the policy refuses
    (a host name is checked each time a delivery connects)."""
    allow = parse_allow(settings.webhook_allow, public=settings.webhook_allow_public)
    for n, spec in enumerate(specs):
        problem = url_problem(spec.url)
        if problem is None:
            host = urlsplit(spec.url).hostname or ""
            literal = literal_address(host)
            problem = (
                address_problem(host, literal, allow) if literal is not None else host_problem(host, allow)
            )
        if problem:
            raise CandidateError(f"webhooks[{n}]: {problem}")


async def tell_webhooks(services: Services, loop_id: str, state: str) -> None:
    """A loop paused or stopped by a caller: its webhooks hear of it (a stop finishes the loop)."""
    if state == "paused":
        await webhooks.emit(services.store, loop_id, WebhookEvent.loop_paused, "paused")
    elif state == "stopped":
        await webhooks.emit(services.store, loop_id, WebhookEvent.loop_finished, "stopped", "loop_finished")
    services.webhooks.wake()


async def webhook_notice(services: Services, loop_id: str) -> str:
    """The loop page's line about webhook deliveries that fail (nothing when none do)."""
    failed, retrying, newest = await webhooks.loop_failures(services.store, loop_id)
    if newest is None:
        return ""
    parts = [f"{failed} failed" if failed else "", f"{retrying} failing, retried" if retrying else ""]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(newest.created_at))
    return (
        f'<section id="webhooks" data-live class="notice"><b>Webhook deliveries:</b> '
        f"{html.escape(', '.join(p for p in parts if p))}. Latest: {html.escape(newest.event)} of {when},"
        f" {newest.attempts} attempt(s): {html.escape(newest.last_error or '')}"
        f' (<a href="/v1/webhooks/deliveries?loop_id={html.escape(loop_id)}">deliveries</a>)</section>'
    )


class WebhookController(Controller):
    path = "/v1"
    tags = ["webhooks"]

    @get(
        "/webhooks",
        operation_id="listWebhooks",
        summary="Webhooks (of one loop and the service-wide one, with loop_id) and their delivery counts",
        responses=errors(),
    )
    async def list_webhooks(
        self,
        services: Services,
        loop_id: Annotated[str | None, Parameter(pattern=r"^[0-9a-f]{16}$", description="one loop's")] = None,
    ) -> list[WebhookView]:
        return await webhooks.list_webhooks(services.store, loop_id)

    @post(
        "/loops/{loop_id:str}/webhooks",
        operation_id="addLoopWebhook",
        status_code=HTTP_201_CREATED,
        summary="Add a webhook to a loop (admin); it is told of events from now on",
        responses=errors(404, 409, 422),
    )
    async def add(self, loop_id: LoopId, data: WebhookSpec, services: Services) -> WebhookView:
        loop = await loop_or_404(services, loop_id, counts=False)
        if loop.state == "stopped":
            raise enqueue.Conflict(f"loop {loop.name} is stopped: it has no events left to tell")
        check_webhooks([data], services.settings)
        (hook_id,) = await webhooks.add_webhooks(services.store, loop_id, [data])
        return next(h for h in await webhooks.list_webhooks(services.store, loop_id) if h.id == hook_id)

    @delete(
        "/webhooks/{webhook_id:str}",
        operation_id="deleteWebhook",
        status_code=HTTP_204_NO_CONTENT,
        summary="Delete a loop's webhook and its deliveries (admin)",
        responses=errors(404, 409),
    )
    async def remove(self, webhook_id: Id, services: Services) -> None:
        if webhook_id == webhooks.SERVICE_HOOK:
            raise enqueue.Conflict(
                "the service-wide webhook comes from RATCHET_WEBHOOK_URL: unset it and restart"
            )
        if not await webhooks.delete_webhook(services.store, webhook_id):
            raise NotFoundException(f"no webhook {webhook_id}; list them with GET /v1/webhooks")

    @get(
        "/webhooks/deliveries",
        operation_id="listWebhookDeliveries",
        summary="Deliveries, newest first: state, attempts, the receiver's last answer or error",
        responses=errors(),
    )
    async def deliveries(
        self,
        services: Services,
        webhook_id: Annotated[str | None, Parameter(pattern=r"^([0-9a-f]{16}|service)$")] = None,
        loop_id: Annotated[str | None, Parameter(pattern=r"^[0-9a-f]{16}$")] = None,
        delivery_state: Annotated[
            DeliveryState | None, Parameter(query="state", description="filter")
        ] = None,
        before: Annotated[float | None, Parameter(ge=0, description="created before (next_before)")] = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> DeliveryPage:
        return await webhooks.list_deliveries(
            services.store,
            webhook_id=webhook_id,
            loop_id=loop_id,
            state=delivery_state,
            before=before,
            limit=limit,
        )

    @post(
        "/webhooks/deliveries/{delivery_id:str}/retry",
        operation_id="retryWebhookDelivery",
        status_code=HTTP_200_OK,
        summary="Try a failed delivery again now (admin)",
        responses=errors(404),
    )
    async def retry(self, delivery_id: DeliveryId, services: Services) -> DeliveryView:
        if not await webhooks.redeliver(services.store, delivery_id):
            raise NotFoundException(
                f"no failed delivery {delivery_id}; list them with GET /v1/webhooks/deliveries"
            )
        services.webhooks.wake()
        found = await webhooks.get_delivery(services.store, delivery_id)
        assert found is not None
        return found
