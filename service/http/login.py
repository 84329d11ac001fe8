"""`/login` and `/logout`: a browser trades an API token for a session cookie once, then reads the
pages (and everything they link to) with it. The token is checked on every request (see
`auth.Authenticator._browser_session`): revoking it ends the session.

Both forms carry a CSRF token (Litestar's `CSRFMiddleware`, double-submit: a signed token in a
SameSite=Strict cookie and the same token in the form), so another site can neither log a browser
in with a token of its choosing nor log it out. The session cookie is HttpOnly, SameSite=Strict and
Secure as `sessions.secure_cookie` says.
"""

from __future__ import annotations

import html
import re
import secrets
import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.config.csrf import CSRFConfig
from litestar.enums import RequestEncodingType
from litestar.exceptions import PermissionDeniedException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.params import Body
from litestar.response import Redirect
from litestar.utils.scope.state import ScopeState

from ..models import Scope
from ..settings import Settings
from ..state.tokens import hash_secret
from .auth import Authenticator, holds
from .sessions import NEW_SESSION, secure_cookie

__all__ = ["LoginController", "login_controller", "login_required_page"]

CSRF_COOKIE = "ratchet_csrf"
CSS = (
    "body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #202124; background: #fafafa; }"
    " header { padding: 14px 24px; background: #fff; border-bottom: 1px solid #e0e3e7; }"
    " header h1 { margin: 0; font-size: 20px; } main { padding: 16px 24px; max-width: 720px; }"
    " a { color: #1a73e8; } .muted { color: #5f6368; }"
)
_NEXT = re.compile(r"^/(?![/\\])[^\s\\]*$")  # a path on this site, never //elsewhere


class LoginForm(msgspec.Struct, kw_only=True):
    token: str = ""
    next: str = "/loops"


def login_controller(settings: Settings) -> type[LoginController]:
    """The login routes behind Litestar's CSRF middleware (on them alone: the API has no forms)."""
    return type("LoginRoutes", (LoginController,), {"middleware": [_csrf_middleware(settings)]})


def _csrf_middleware(settings: Settings) -> DefineMiddleware:
    # A fresh secret per process: a form left open across a restart is refused once and reloaded.
    config = CSRFConfig(
        secret=secrets.token_hex(32),
        cookie_name=CSRF_COOKIE,
        cookie_secure=settings.cookie_secure == "true",
        cookie_httponly=True,
        cookie_samesite="strict",
    )
    return DefineMiddleware(CSRFMiddleware, config=config)


def _safe_next(target: str | None) -> str:
    return target if target and _NEXT.match(target) and len(target) < 2000 else "/loops"


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response[str]:
    nonce = secrets.token_urlsafe(16)
    doc = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f'<title>{html.escape(title)} · Ratchet</title><style nonce="{nonce}">{CSS}'
        " form.login { display: grid; gap: 10px; max-width: 420px; }"
        " form.login input[type=password] { font: inherit; padding: 6px 8px; }"
        " .problem { color: #c0392b; } button { font: inherit; padding: 6px 14px; width: max-content; }"
        f'</style></head><body><header><h1>Ratchet</h1></header><main id="login">{body}</main></body></html>'
    )
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; form-action 'self'; base-uri 'none';"
        " frame-ancestors 'none'"
    )
    return Response(
        doc,
        status_code=status,
        media_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            **(headers or {}),
        },
    )


def _csrf(request: Request[Any, Any, Any]) -> str:
    return html.escape(str(ScopeState.from_scope(request.scope).csrf_token or ""))


def _form(request: Request[Any, Any, Any], next_path: str, problem: str = "") -> str:
    note = f'<p class="problem" id="problem">{html.escape(problem)}</p>' if problem else ""
    return (
        f"<h2>Log in</h2>{note}"
        '<p class="muted">Paste an API token that may read (scope <code>read</code> or <code>admin</code>).'
        " The browser keeps a session cookie; the token itself is not stored in it, and revoking the"
        " token ends the session. The session only ever reads.</p>"
        '<form class="login" method="post" action="/login">'
        f'<input type="hidden" name="_csrf_token" value="{_csrf(request)}">'
        f'<input type="hidden" name="next" value="{html.escape(next_path)}">'
        '<label>API token <input type="password" name="token" autocomplete="current-password" required'
        ' autofocus></label><button type="submit">Log in</button></form>'
    )


def _csrf_refused() -> Response[str]:
    return _page(
        "Log in",
        "<h2>Form expired</h2><p>The form was not this page's own (or the service restarted since it"
        ' was shown). <a href="/login">Open the login page again</a>.</p>',
        status=403,
    )


def _plain_http_refused() -> Response[str]:
    return _page(
        "Log in",
        "<h2>Log in over https</h2><p>This page was reached over plain http on a host that is not"
        " loopback, where a session cookie would travel in clear. Put a TLS proxy in front of the"
        " service (it must pass <code>X-Forwarded-Proto: https</code>), or set"
        " <code>RATCHET_COOKIE_SECURE=false</code> if the network is trusted.</p>",
        status=400,
    )


def login_required_page(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """What a page answers without a valid session: 401 and a link to /login (403 for a token
    that may not read)."""
    status = 403 if isinstance(exc, PermissionDeniedException) else 401
    target = html.escape(f"/login?next={request.url.path}")
    why = "Your token may not read these pages." if status == 403 else "You are not logged in."
    body = (
        f"<h2>{'Not allowed' if status == 403 else 'Log in to see this page'}</h2><p>{why}"
        f' <a id="login-link" href="{target}">Log in with an API token</a>.</p>'
    )
    return _page("Log in", body, status=status, headers={"WWW-Authenticate": 'Bearer realm="ratchet"'})


class LoginController(Controller):
    path = "/"
    include_in_schema = False
    opt = {"auth": "open"}
    exception_handlers = {PermissionDeniedException: lambda request, exc: _csrf_refused()}

    @get("/login")
    async def login_form(
        self,
        request: Request[Any, Any, Any],
        guard: Authenticator,
        settings: Settings,
        next: str | None = None,
    ) -> Response[str]:
        target = _safe_next(next)
        if guard.mode == "none":
            return Redirect(target)  # type: ignore[return-value]
        if secure_cookie(settings.cookie_secure, request) is None:
            return _plain_http_refused()
        session = request.scope.get("session")
        if isinstance(session, dict) and session.get("token_hash"):
            token = await guard.session_token(str(session["token_hash"]))
            if token is not None:
                name = html.escape(token.name)
                return _page(
                    "Logged in",
                    f'<h2>Logged in</h2><p id="who">as token <b>{name}</b>.'
                    f' <a href="{html.escape(target)}">Go on</a> · <a href="/logout">log out</a></p>',
                )
        return _page("Log in", _form(request, target))

    @post("/login", status_code=303)
    async def login(
        self,
        request: Request[Any, Any, Any],
        guard: Authenticator,
        settings: Settings,
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[str]:
        target = _safe_next(data.next)
        if guard.mode == "none":
            return Redirect(target)  # type: ignore[return-value]
        if secure_cookie(settings.cookie_secure, request) is None:
            return _plain_http_refused()
        token = await guard.login_token(data.token.strip()) if data.token.strip() else None
        if token is None:
            return _page("Log in", _form(request, target, "That token is unknown or revoked."), status=401)
        if not holds(token, Scope.read):
            problem = f"Token {token.name!r} may not read: it needs the read or admin scope."
            return _page("Log in", _form(request, target, problem), status=403)
        secret_hash = hash_secret(data.token.strip())
        request.scope[NEW_SESSION] = True  # type: ignore[literal-required]
        request.set_session(
            {"token_hash": secret_hash, "token_id": token.id, "name": token.name, "at": time.time()}
        )
        return Redirect(target, status_code=303)  # type: ignore[return-value]

    @get("/logout")
    async def logout_form(self, request: Request[Any, Any, Any]) -> Response[str]:
        return _page(
            "Log out",
            '<h2>Log out</h2><form class="login" method="post" action="/logout">'
            f'<input type="hidden" name="_csrf_token" value="{_csrf(request)}">'
            '<button type="submit">Log out</button></form>',
        )

    @post("/logout", status_code=303)
    async def logout(self, request: Request[Any, Any, Any]) -> Response[str]:
        request.clear_session()
        return Redirect("/login", status_code=303)  # type: ignore[return-value]
