"""Posts webhook deliveries: a steady loop that turns new results into deliveries (`webhooks.scan`),
sends the due ones (a few at a time) and writes each attempt's outcome.

Each attempt is signed afresh (`rules.webhooks.sign`, the attempt's time) and posted with a time
limit; a 2xx delivers it; a timeout, a network error, a 5xx, 408 or 429 is tried again after a
back-off that doubles (a longer Retry-After wins) until `webhook_attempts`; any other answer (a
redirect, a 4xx) and a refused destination fail it at once. Nothing but the pending rows is
remembered, so after a restart every delivery that was pending is due again: a receiver may see a
message twice (its `id` tells), never lose one.

Destinations are checked where the connection is made (`_GuardedNetwork`): the host name is
resolved here and every address it resolves to must pass `rules.webhooks.address_problem`; the
connection then goes to a checked address (TLS still verifies the host name), so a name that
resolves differently a moment later cannot steer a delivery to a refused address. Proxies from the
environment are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore

from ..ops_models import DeliveryState
from ..rules.webhooks import Allow, address_problem, backoff_s, host_problem, parse_allow, sign, url_problem
from ..settings import Settings
from ..state import webhooks
from ..state.store import Store

__all__ = ["Refused", "WebhookSender"]

log = logging.getLogger("ratchet.webhooks")
USER_AGENT = "ratchet-webhooks/1"
TICK_S = 1.0
PARALLEL = 8
RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


class Refused(Exception):
    """The destination is not allowed (see `rules.webhooks.address_problem`)."""


class _GuardedNetwork(httpcore.AsyncNetworkBackend):
    def __init__(self, allow: Allow) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow = allow

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        problem = host_problem(host, self._allow)
        if problem:
            raise Refused(problem)
        addresses = await self._resolve(host, port, timeout)
        for address in addresses:
            problem = address_problem(host, ipaddress.ip_address(address), self._allow)
            if problem:
                raise Refused(problem)
        error: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                error = exc
        raise error

    @staticmethod
    async def _resolve(host: str, port: int, timeout: float | None) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise Refused("webhooks go over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Outcome:
    __slots__ = ("error", "final", "retry_after", "status")

    def __init__(
        self, status: int | None, error: str | None, final: bool, retry_after: float | None = None
    ) -> None:
        self.status, self.error, self.final, self.retry_after = status, error, final, retry_after

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """The background task that sends deliveries; `wake` makes it look now rather than within a second."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        service_host = urlsplit(settings.webhook_url).hostname if settings.webhook_url else None
        # The operator's own URL needs no allow-listing: only link-local and metadata stay refused.
        hosts = [service_host] if service_host else []
        self.allow = parse_allow(settings.webhook_allow, hosts, public=settings.webhook_allow_public)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            network_backend=_GuardedNetwork(self.allow),
            max_connections=PARALLEL,
            retries=0,
        )
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed_attempts = 0

    def __repr__(self) -> str:
        busy, sent, failed = len(self._busy), self.sent, self.failed_attempts
        return f"<WebhookSender sending={busy} sent={sent} failed_attempts={failed}>"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ratchet-webhooks")

    async def stop(self) -> None:
        """Stops sending; an attempt cut short stays pending and is made again after the restart."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._pool.aclose()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook pass failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    async def _tick(self) -> None:
        if await webhooks.new_results(self.store):
            await webhooks.scan(self.store)
        room = PARALLEL - len(self._busy)
        if room <= 0:
            return
        for item in await webhooks.due(self.store, time.time(), room, self._busy):
            self._busy.add(item.id)
            task = asyncio.create_task(self._deliver(item), name=f"webhook-{item.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, item: webhooks.Due) -> None:
        try:
            outcome = await self._attempt(item)
            attempts = item.attempts + 1
            if outcome.ok:
                self.sent += 1
                await webhooks.record_attempt(
                    self.store, item.id, DeliveryState.delivered, outcome.status, None, None
                )
                return
            self.failed_attempts += 1
            if outcome.final or attempts >= self.settings.webhook_attempts:
                log.warning(
                    "webhook delivery %s (%s) failed for good: %s", item.id, item.event, outcome.error
                )
                await webhooks.record_attempt(
                    self.store, item.id, DeliveryState.failed, outcome.status, outcome.error, None
                )
                return
            delay = backoff_s(attempts, self.settings.webhook_backoff_s, outcome.retry_after)
            await webhooks.record_attempt(
                self.store, item.id, DeliveryState.pending, outcome.status, outcome.error, time.time() + delay
            )
        finally:
            self._busy.discard(item.id)
            self.wake()

    async def _attempt(self, item: webhooks.Due) -> _Outcome:
        problem = url_problem(item.url)
        if problem:
            return _Outcome(None, problem, final=True)
        timestamp = int(time.time())
        headers = [
            (b"Content-Type", b"application/json"),
            (b"User-Agent", USER_AGENT.encode()),
            (b"X-Ratchet-Event", item.event.encode()),
            (b"X-Ratchet-Delivery", item.id.encode()),
            (b"X-Ratchet-Signature", sign(item.secret, timestamp, item.body).encode()),
        ]
        limit = self.settings.webhook_timeout_s
        timeouts = {"connect": limit, "read": limit, "write": limit, "pool": limit}
        try:
            async with asyncio.timeout(3 * limit):
                async with self._pool.stream(
                    "POST", item.url, headers=headers, content=item.body, extensions={"timeout": timeouts}
                ) as response:
                    status = response.status
                    retry_after = _retry_after(response.headers)
        except Refused as exc:
            return _Outcome(None, f"refused: {exc}", final=True)
        except (TimeoutError, httpcore.TimeoutException):
            return _Outcome(None, f"no answer within {limit:g} s", final=False)
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            return _Outcome(
                None, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__, False
            )
        if 200 <= status < 300:
            return _Outcome(status, None, final=True)
        if 300 <= status < 400:
            return _Outcome(status, f"HTTP {status}: redirects are not followed; give the final URL", True)
        return _Outcome(status, f"HTTP {status}", final=status not in RETRYABLE, retry_after=retry_after)


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for key, value in headers:
        if key.lower() == b"retry-after":
            with contextlib.suppress(ValueError):
                return max(0.0, float(value.decode("latin-1").strip()))
    return None
