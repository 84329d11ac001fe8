"""Browser sessions through Litestar's own server-side session support: `ServerSideSessionConfig`
with the session data kept in the service's database (`state.sessions`), and a backend that differs
from Litestar's in three ways:

- a request whose session did not change writes nothing and sets no cookie (Litestar's would store
  an empty session, with a fresh cookie, for every API call);
- a login gets a new session id (no session fixation);
- the cookie is `Secure` as `secure_cookie` decides per request: over https always, over plain
  http only to a loopback host name (browsers keep a `Secure` cookie from http://localhost, not
  from every loopback address), or as RATCHET_COOKIE_SECURE forces.

What a session holds: the SHA-256 of the token it was opened with (`token_hash`), the token's id
and name. `auth.Authenticator` checks that token on every request.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.middleware import DefineMiddleware
from litestar.middleware.session.base import SessionMiddleware
from litestar.middleware.session.server_side import ServerSideSessionBackend, ServerSideSessionConfig
from litestar.stores.base import Store as LitestarStore
from litestar.types import Empty, Message, Receive, Scope, ScopeSession, Send

from ..settings import Settings
from ..state import sessions
from ..state.store import Store

__all__ = [
    "COOKIE",
    "NEW_SESSION",
    "DatabaseSessions",
    "is_loopback_host",
    "secure_cookie",
    "session_config",
    "session_middleware",
]

COOKIE = "ratchet_session"
NEW_SESSION = "ratchet.new_session"  # scope key a login sets: issue a new session id
_LOADED = "ratchet.loaded_session"


def _seconds(value: int | timedelta | None, default: float) -> float:
    if value is None:
        return default
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class DatabaseSessions(LitestarStore):
    """Litestar's store interface over `state.sessions` (the store is opened by the lifespan)."""

    def __init__(self, store: Callable[[], Store], max_age_s: float) -> None:
        self._store = store
        self._max_age = max_age_s

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        data = value.encode() if isinstance(value, str) else value
        token_id = str(msgspec.json.decode(data).get("token_id", ""))
        await sessions.put_session(self._store(), key, token_id, data, _seconds(expires_in, self._max_age))

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        found = await sessions.get_session(self._store(), key)
        return found[0] if found else None

    async def delete(self, key: str) -> None:
        await sessions.delete_session(self._store(), key)

    async def delete_all(self) -> None:
        await sessions.delete_all(self._store())

    async def exists(self, key: str) -> bool:
        return await sessions.get_session(self._store(), key) is not None

    async def expires_in(self, key: str) -> int | None:
        found = await sessions.get_session(self._store(), key)
        return int(found[1] - time.time()) if found else None


def is_loopback_host(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_cookie(setting: str, connection: ASGIConnection) -> bool | None:
    """True: mark the cookie Secure; False: do not; None: refuse to log in (plain http to a host
    that is not loopback: the cookie would travel in clear, or be dropped by the browser)."""
    if setting != "auto":
        return setting == "true"
    if connection.scope.get("scheme") in ("https", "wss"):
        return True
    return False if is_loopback_host(connection.headers.get("host", "")) else None


class _Backend(ServerSideSessionBackend):
    config: _Config

    async def load_from_connection(self, connection: ASGIConnection) -> dict[str, Any]:
        data = await super().load_from_connection(connection)
        connection.scope[_LOADED] = dict(data)  # type: ignore[literal-required]
        return data

    def get_session_id(self, connection: ASGIConnection) -> str:
        if connection.scope.get(NEW_SESSION):
            new = connection.scope.get(f"{NEW_SESSION}.id")
            if not new:
                new = connection.scope[f"{NEW_SESSION}.id"] = self.generate_session_id()  # type: ignore[literal-required]
            return str(new)
        return super().get_session_id(connection)

    async def store_in_message(
        self, scope_session: ScopeSession, message: Message, connection: ASGIConnection
    ) -> None:
        fresh = bool(connection.scope.get(NEW_SESSION))
        loaded = connection.scope.get(_LOADED, {})
        old_id = connection.cookies.get(self.config.key)
        if not fresh and scope_session is not Empty and scope_session == loaded:
            return  # nothing changed: no write, no cookie
        store = self.config.get_store_from_app(connection.scope["app"])
        headers = MutableScopeHeaders.from_message(message)
        secure = bool(secure_cookie(self.config.secure_setting, connection))
        params = {"path": "/", "httponly": True, "samesite": "strict", "secure": secure}
        if old_id and (fresh or scope_session is Empty or not scope_session):
            await self.delete(old_id, store=store)
        if scope_session is Empty or not scope_session:
            if old_id:
                headers.add(
                    "Set-Cookie",
                    Cookie(key=self.config.key, value="", expires=0, **params).to_header(header=""),
                )
            return
        session_id = self.get_session_id(connection)
        await self.set(session_id, self.serialize_data(scope_session, connection.scope), store)
        cookie = Cookie(key=self.config.key, value=session_id, max_age=self.config.max_age, **params)
        headers.add("Set-Cookie", cookie.to_header(header=""))


class _Config(ServerSideSessionConfig):
    _backend_class = _Backend
    secure_setting: str = "auto"


class _CookieGated(SessionMiddleware):  # type: ignore[type-arg]
    """Litestar's session middleware, run only for the requests that can have a session: those
    carrying the session cookie, and /login and /logout (which make and end one). API clients send
    no such cookie and skip its cost (about 20 µs a request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _may_have_session(scope):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_COOKIE_MARK = f"{COOKIE}=".encode()


def _may_have_session(scope: Scope) -> bool:
    if scope["path"] in ("/login", "/logout"):
        return True
    return any(name == b"cookie" and _COOKIE_MARK in value for name, value in scope["headers"])


def session_middleware(settings: Settings) -> DefineMiddleware:
    config = session_config(settings)
    return DefineMiddleware(_CookieGated, backend=config._backend_class(config=config))


def session_config(settings: Settings) -> ServerSideSessionConfig:
    config = _Config(
        key=COOKIE,
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure == "true",
        store="sessions",
        scopes={"http"},  # type: ignore[arg-type]
    )
    config.secure_setting = settings.cookie_secure
    return config
