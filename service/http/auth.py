"""Who may call what. One guard on the whole app: each route needs a scope (`read` for GET, `admin`
for anything else, unless its handler says otherwise in `opt`), and a caller proves it holds that
scope with `Authorization: Bearer <token>`. With auth "none" (the default on a loopback address)
every caller holds every scope.

Handler `opt` keys: `auth="open"` (no token ever), `auth="metrics"` (open unless `metrics_auth`),
`scope="submit"` (instead of the method's default), `loop="path"|"experiment"` (where a token
restricted to some loops finds the loop: the `loop_id` path parameter, or the loop of `exp_id`).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import Literal

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import Components, SecurityScheme

from ..models import LoopView, Scope, TokenView
from ..settings import Settings, SettingsError
from ..state.tokens import find_token, find_token_by_hash, hash_secret
from .services import Services

__all__ = [
    "BOOTSTRAP",
    "SECURITY",
    "SECURITY_COMPONENTS",
    "Authenticator",
    "auth_mode",
    "holds",
    "is_loopback",
]

log = logging.getLogger("ratchet.auth")

AuthMode = Literal["none", "tokens"]
SCHEMA_PREFIX = "/schema"  # the OpenAPI document describes the API, it holds no data: always open
HOW = (
    "send `Authorization: Bearer <token>` (the ratchet CLI: --token or RATCHET_TOKEN; a browser: log in"
    " at /login); an admin makes tokens with `ratchet token create`, the first admin token is the"
    " service's RATCHET_ADMIN_TOKEN or the one its first start printed"
)
BOOTSTRAP = TokenView(id="bootstrap", name="RATCHET_ADMIN_TOKEN", scopes=[Scope.admin], created_at=0)
SECURITY_COMPONENTS = Components(
    security_schemes={
        "bearer": SecurityScheme(
            type="http",
            scheme="bearer",
            description="An API token (scopes read, submit, admin). Not needed when the service runs"
            " with auth none (the default on a loopback address).",
        )
    }
)
SECURITY = [{"bearer": []}]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def auth_mode(settings: Settings) -> AuthMode:
    """The effective mode; auth none on a non-loopback address needs an explicit opt-in."""
    loopback = is_loopback(settings.host)
    mode: AuthMode = settings.auth or ("none" if loopback else "tokens")
    if mode == "none" and not loopback and not settings.auth_none_on_network:
        raise SettingsError(
            f"auth none on {settings.host}, which is not a loopback address, lets anyone who reaches"
            " the port run code here; use RATCHET_AUTH=tokens with RATCHET_ADMIN_TOKEN, or set"
            " RATCHET_AUTH_NONE_ON_NETWORK=1 if that is really meant"
        )
    return mode


def holds(token: TokenView, scope: Scope) -> bool:
    return scope in token.scopes or Scope.admin in token.scopes


class Authenticator:
    """The app's guard (see the module docstring)."""

    def __init__(self, settings: Settings, services: Callable[[], Services]) -> None:
        self.mode = auth_mode(settings)
        self.metrics_auth = settings.metrics_auth
        self._admin_hash = hash_secret(settings.admin_token) if settings.admin_token else None
        self._services = services

    def required(self, handler: BaseRouteHandler, path: str) -> Scope | None:
        opt = handler.opt
        if opt.get("auth") == "open" or path.startswith(SCHEMA_PREFIX):
            return None
        if opt.get("auth") == "metrics":
            return Scope.read if self.metrics_auth else None
        if "scope" in opt:
            return Scope(opt["scope"])
        methods = set(getattr(handler, "http_methods", {"GET"}))
        if methods <= {"OPTIONS"}:
            return None  # says which methods exist, nothing more
        return Scope.read if methods <= {"GET", "HEAD"} else Scope.admin

    async def __call__(self, connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        if self.mode == "none":
            return
        scope = self.required(handler, connection.scope["path"])
        if scope is None:
            return
        if scope is Scope.read and await self._browser_session(connection):
            return
        token = await self._token(connection)
        where = f"{connection.scope['method']} {connection.scope['path']}"
        if not holds(token, scope):
            raise PermissionDeniedException(
                f"token {token.name!r} lacks the {scope.value!r} scope that {where} needs;"
                f" ask an admin for a token with --scope {scope.value}"
            )
        if scope is Scope.submit and token.loops is not None and not holds(token, Scope.admin):
            await self._check_loop(connection, handler, token)

    async def _browser_session(self, connection: ASGIConnection) -> bool:
        """A read (GET or HEAD, no Authorization header) by a browser logged in at /login, with a
        token that still exists and may read. A cookie never grants more than reading, whatever its
        token may do: writes need the bearer header, which no other site can make a browser send."""
        if connection.scope["method"] not in ("GET", "HEAD") or "authorization" in connection.headers:
            return False
        session = connection.scope.get("session")
        if not isinstance(session, dict) or not session.get("token_hash"):
            return False
        token = await self.session_token(str(session["token_hash"]))
        if token is None or not holds(token, Scope.read):
            connection.clear_session()  # revoked (or no longer able to read): the cookie is dropped
            return False
        return True

    async def session_token(self, digest: str) -> TokenView | None:
        """The token a session was opened with, while it exists (the bootstrap one while it is set)."""
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return BOOTSTRAP
        return await find_token_by_hash(self._services().store, digest)

    async def login_token(self, secret: str) -> TokenView | None:
        """The token a secret typed into /login names, or None."""
        if self._admin_hash and hmac.compare_digest(hash_secret(secret), self._admin_hash):
            return BOOTSTRAP
        return await find_token(self._services().store, secret)

    async def _token(self, connection: ASGIConnection) -> TokenView:
        header = connection.headers.get("authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="ratchet"'}
        if not header:
            raise NotAuthorizedException(f"authentication required: {HOW}", headers=challenge)
        kind, _, secret = header.partition(" ")
        secret = secret.strip()
        if kind.lower() != "bearer" or not secret:
            raise NotAuthorizedException(
                "the Authorization header must read `Bearer <token>`", headers=challenge
            )
        if self._admin_hash and hmac.compare_digest(hash_secret(secret), self._admin_hash):
            return BOOTSTRAP
        token = await find_token(self._services().store, secret)
        if token is None:
            raise NotAuthorizedException(f"the bearer token is unknown or revoked: {HOW}", headers=challenge)
        return token

    async def _check_loop(
        self, connection: ASGIConnection, handler: BaseRouteHandler, token: TokenView
    ) -> None:
        loop = await self._loop(connection, handler.opt.get("loop"))
        allowed = token.loops or []
        if loop is not None and loop.id not in allowed and loop.name not in allowed:
            raise PermissionDeniedException(
                f"token {token.name!r} may submit only to the loops {', '.join(allowed)};"
                f" loop {loop.name!r} is not one of them"
            )

    async def _loop(self, connection: ASGIConnection, where: str | None) -> LoopView | None:
        """The loop the request is about, or None when it does not exist (the handler says 404)."""
        store = self._services().store
        params = connection.path_params
        if where == "path":
            return await store.get_loop(str(params.get("loop_id", "")), counts=False)
        if where == "experiment":
            exp = await store.get_experiment(str(params.get("exp_id", "")), with_tail=False)
            return await store.get_loop(exp.loop_id, counts=False) if exp else None
        raise RuntimeError(f"{connection.scope['path']}: a restricted submit route must name its loop")
