"""What the lifespan opens for operating the service besides running experiments: the service-wide
webhook and the sender of deliveries, expired browser sessions swept. `create_app` calls
`check_settings` before anything starts, `open_operations` in its lifespan."""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import urlsplit

from ..ops_models import WebhookSpec
from ..rules.webhooks import parse_events, url_problem
from ..runs.webhook_sender import WebhookSender
from ..settings import Settings, SettingsError
from ..state import sessions, webhooks
from ..state.store import Store

__all__ = ["check_settings", "open_operations", "service_webhook"]

log = logging.getLogger("ratchet")


def service_webhook(settings: Settings) -> WebhookSpec | None:
    """The service-wide webhook of RATCHET_WEBHOOK_*, or None; SettingsError naming what is wrong."""
    if not settings.webhook_url:
        return None
    problem = url_problem(settings.webhook_url)
    if problem:
        raise SettingsError(f"RATCHET_WEBHOOK_URL: {problem}")
    try:
        events = parse_events(settings.webhook_events)
    except ValueError as exc:
        raise SettingsError(f"RATCHET_WEBHOOK_EVENTS: {exc}") from None
    secret, streak = settings.webhook_secret, settings.webhook_streak
    return WebhookSpec(url=settings.webhook_url, secret=secret, events=events, streak=streak)


def check_settings(settings: Settings) -> None:
    service_webhook(settings)


async def open_operations(
    settings: Settings, store: Store, mode: str, stack: contextlib.AsyncExitStack
) -> WebhookSender:
    await webhooks.set_service_hook(store, service_webhook(settings))
    swept = await sessions.purge_expired(store)
    if swept:
        log.info("swept %d expired browser session(s)", swept)
    sender = WebhookSender(settings, store)
    await sender.start()
    stack.push_async_callback(sender.stop)
    if settings.webhook_url:
        log.info("webhooks: service-wide to %s", urlsplit(settings.webhook_url).hostname)
    return sender

