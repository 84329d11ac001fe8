"""What the lifespan opens for operating the service besides running experiments: the first admin
token of a fresh service, the service-wide webhook and the sender of deliveries, expired sessions
swept. `create_app` calls `check_settings` before anything starts, `open_operations` in its lifespan."""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import urlsplit

from ..models import Scope, TokenCreate
from ..ops_models import WebhookSpec
from ..rules.webhooks import parse_events, url_problem
from ..runs.webhook_sender import WebhookSender
from ..settings import Settings, SettingsError
from ..state import sessions, tokens, webhooks
from ..state.store import Store

__all__ = ["FIRST_TOKEN_NAME", "check_settings", "open_operations", "service_webhook"]

log = logging.getLogger("ratchet")
FIRST_TOKEN_NAME = "first-admin"


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
    if mode == "tokens" and not settings.admin_token:
        await _first_admin_token(store)
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


async def _first_admin_token(store: Store) -> None:
    """A service with tokens on, no admin token configured and no token at all could never be
    used: it makes one admin token and shows it once, in its log. Later starts find a token and
    show nothing."""
    if await tokens.count_tokens(store):
        return
    made = await tokens.create_token(store, TokenCreate(name=FIRST_TOKEN_NAME, scopes=[Scope.admin]))
    rule = "=" * 78
    log.warning(
        "\n%s\nFirst start: no RATCHET_ADMIN_TOKEN is set and no token exists, so an admin token was"
        " made.\nIt is shown this once (only its hash is stored):\n\n    RATCHET_TOKEN=%s\n\n"
        "Use it as `Authorization: Bearer <token>` or RATCHET_TOKEN, log in at /login with it,"
        " make scoped\ntokens with `ratchet token create`, and revoke it when you have your own"
        " (`ratchet token revoke %s`).\n%s",
        rule,
        made.secret,
        made.id,
        rule,
    )
