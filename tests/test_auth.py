"""Access control against a real service with RATCHET_AUTH=tokens: every route of the app (read from
the app itself, so a new route is covered as soon as it exists) answers 401 without a valid token
and 403 without the scope it needs; tokens restricted to loops, revocation, storage and the CLI."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3

import httpx
import pytest
from click.testing import CliRunner
from litestar.routes import HTTPRoute
from test_api import make_loop

from service.cli import cli
from service.http.app import _log_auth, create_app
from service.http.auth import auth_mode
from service.settings import Settings, SettingsError

ADMIN = "bootstrap-" + secrets.token_hex(16)
SECURED = {"RATCHET_AUTH": "tokens", "RATCHET_ADMIN_TOKEN": ADMIN}
NO_LOOP, NO_EXP, NO_TOKEN = "0" * 16, "1" * 16, "2" * 16

# The policy, written out independently of service.http.auth: GET needs read, anything else admin,
# except these.
OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/login"), ("GET", "/logout")}
# open, but their forms need the CSRF token of the login page (none here: 403 for everyone)
CSRF = {("POST", "/login"), ("POST", "/logout")}
# HTML pages answer 401/403 with a page that links to /login, not with JSON
PAGES = {("GET", "/"), ("GET", "/loops"), ("GET", "/loops/{loop_id}")}
SUBMIT = {
    ("POST", "/v1/loops/{loop_id}/experiments"),
    ("POST", "/v1/loops/{loop_id}/baseline"),
    ("POST", "/v1/experiments/{exp_id}/rerun"),
}
ADMIN_ONLY_READS = {("GET", "/v1/tokens"), ("GET", "/v1/service")}
CALLERS = ("nobody", "wrong", "read", "submit", "admin")


def app_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the service serves, the OpenAPI document's aside."""
    app = create_app(Settings())
    found = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith("/schema"):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        found += [(m, path) for m in sorted(route.methods - {"OPTIONS", "HEAD"})]
    return found


def needed(method: str, path: str) -> str | None:
    if (method, path) in OPEN | CSRF:
        return None
    if (method, path) in SUBMIT:
        return "submit"
    if (method, path) in ADMIN_ONLY_READS:
        return "admin"
    return "read" if method == "GET" else "admin"


def allowed(caller: str, scope: str | None) -> bool:
    if scope is None:
        return True
    return caller == "admin" or caller == scope


def call(srv, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, srv.url + path, headers=headers, timeout=30, **kw)


def make_token(srv, name: str, scopes: list[str], loops: list[str] | None = None) -> dict:
    body = {"name": name, "scopes": scopes, **({"loops": loops} if loops else {})}
    r = call(srv, "POST", "/v1/tokens", ADMIN, json=body)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def secured(server_factory):
    srv = server_factory(slots=1, env=SECURED)
    srv.client.headers["Authorization"] = f"Bearer {ADMIN}"  # for make_loop and the waits
    return srv


def test_every_route_needs_its_scope(secured):
    tokens = {s: make_token(secured, f"t-{s}", [s])["secret"] for s in ("read", "submit", "admin")}
    tokens |= {"nobody": None, "wrong": "rt_" + secrets.token_urlsafe(32)}
    ids = {
        "loop_id": NO_LOOP,
        "exp_id": NO_EXP,
        "token_id": NO_TOKEN,
        "snapshot_id": "3" * 64,
        "webhook_id": "4" * 16,
        "delivery_id": "5" * 16,
        "proposal_id": NO_EXP,
    }
    routes = app_routes()
    assert ("POST", "/v1/tokens") in routes and ("GET", "/loops/{loop_id}") in routes
    for method, template in routes:
        path = template.format(**ids)
        scope = needed(method, template)
        for caller in CALLERS:
            # Ids that do not exist and empty bodies: a request that gets past the guard changes nothing.
            r = call(secured, method, path, tokens[caller], json={} if method == "POST" else None)
            what = (caller, method, template, r.status_code, r.text[:200])
            if (method, template) in CSRF:
                assert r.status_code == 403 and "Form expired" in r.text, what
            elif (method, template) in PAGES and not allowed(caller, scope):
                assert r.status_code == (401 if caller in ("nobody", "wrong") else 403), what
                assert 'href="/login?next=' in r.text and r.headers["content-type"].startswith("text/html"), (
                    what
                )
            elif allowed(caller, scope):
                assert r.status_code not in (401, 403), what
            elif caller in ("nobody", "wrong"):
                assert r.status_code == 401, what
                assert "Authorization: Bearer <token>" in r.json()["detail"], what
                assert r.headers["www-authenticate"].startswith("Bearer"), what
            else:
                assert r.status_code == 403, what
                assert f"{scope!r} scope" in r.json()["detail"], what
    assert call(secured, "GET", "/schema/openapi.json").status_code == 200  # documentation is open
    schema = call(secured, "GET", "/schema/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_malformed_authorization_header_is_401(secured):
    for header in ("Basic dXNlcjpwdw==", "Bearer", "Token abc", ADMIN):
        r = httpx.get(secured.url + "/v1/loops", headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["detail"], header


def test_token_restricted_to_loops(secured):
    a = make_loop(secured, name="alpha")
    b = make_loop(secured, name="beta")
    secured.wait_idle(a["id"])
    secured.wait_idle(b["id"])
    for lp in (a, b):
        assert call(secured, "POST", f"/v1/loops/{lp['id']}/pause", ADMIN).status_code == 200
    by_name = make_token(secured, "alpha-agent", ["read", "submit"], loops=["alpha"])["secret"]
    by_id = make_token(secured, "beta-agent", ["submit"], loops=[b["id"]])["secret"]
    edit = {"description": "smaller V", "files": {"train.py": "print('---')\nprint('val_bpb: 0.5')\n"}}
    base_a = call(secured, "GET", f"/v1/loops/{a['id']}/experiments", ADMIN).json()["items"][0]["id"]
    base_b = call(secured, "GET", f"/v1/loops/{b['id']}/experiments", ADMIN).json()["items"][0]["id"]

    assert call(secured, "POST", f"/v1/loops/{a['id']}/experiments", by_name, json=edit).status_code == 202
    assert call(secured, "POST", f"/v1/experiments/{base_a}/rerun", by_name).status_code == 202
    assert call(secured, "POST", f"/v1/loops/{b['id']}/experiments", by_id, json=edit).status_code == 202
    refused = [
        call(secured, "POST", f"/v1/loops/{b['id']}/experiments", by_name, json=edit),
        call(secured, "POST", f"/v1/experiments/{base_b}/rerun", by_name),
        call(secured, "POST", f"/v1/loops/{b['id']}/baseline", by_name),
        call(secured, "POST", f"/v1/loops/{a['id']}/experiments", by_id, json=edit),
    ]
    for r in refused:
        assert r.status_code == 403 and "may submit only to the loops" in r.json()["detail"], r.text
    # reading is not restricted; the refused submissions stored nothing
    counts = {lp["name"]: lp["counts"]["queued"] for lp in call(secured, "GET", "/v1/loops", by_name).json()}
    assert counts == {"alpha": 2, "beta": 1}
    r = call(
        secured, "POST", "/v1/tokens", ADMIN, json={"name": "x", "scopes": ["admin"], "loops": ["alpha"]}
    )
    assert r.status_code == 422 and "admin" in r.json()["detail"]
    for lp in (a, b):
        assert call(secured, "POST", f"/v1/loops/{lp['id']}/stop", ADMIN).status_code == 200


def test_revocation_and_hashed_storage(secured):
    made = make_token(secured, "reader", ["read"])
    secret = made["secret"]
    assert secret.startswith("rt_") and len(secret) > 40
    assert call(secured, "GET", "/v1/loops", secret).status_code == 200
    listed = call(secured, "GET", "/v1/tokens", ADMIN).json()
    mine = next(t for t in listed if t["id"] == made["id"])
    assert "secret" not in mine and mine["scopes"] == ["read"] and mine["last_used_at"] is not None
    assert mine["created_at"] == made["created_at"]

    db_files = sorted(secured.data_dir.glob("ratchet.db*"))
    for path in db_files:  # neither the database nor its WAL holds a secret
        data = path.read_bytes()
        assert secret.encode() not in data and ADMIN.encode() not in data, path
    with sqlite3.connect(secured.data_dir / "ratchet.db") as db:
        (stored,) = db.execute("SELECT hash FROM tokens WHERE id = ?", (made["id"],)).fetchone()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()

    assert call(secured, "DELETE", f"/v1/tokens/{made['id']}", ADMIN).status_code == 204
    r = call(secured, "GET", "/v1/loops", secret)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert call(secured, "DELETE", f"/v1/tokens/{made['id']}", ADMIN).status_code == 404
    r = call(secured, "POST", "/v1/tokens", ADMIN, json={"name": "x", "scopes": ["root"]})
    assert r.status_code == 400 and "scopes" in r.text


def test_cli_token_commands(secured):
    def ratchet(*args: str, token: str | None = ADMIN):
        flags = ["--url", secured.url, *(["--token", token] if token else [])]
        return CliRunner().invoke(cli, [*flags, "token", *args], catch_exceptions=False)

    made = ratchet("create", "ci-agent", "--scope", "read", "--scope", "submit", "--loop", "tiny")
    assert made.exit_code == 0, made.output
    header, secret = made.stdout.splitlines()[:2]
    token_id = re.search(r"\(([0-9a-f]{16})\)", header).group(1)
    assert "read, submit on tiny" in header and secret.startswith("rt_")
    assert call(secured, "GET", "/v1/loops", secret).status_code == 200
    listed = ratchet("list")
    assert listed.exit_code == 0 and token_id in listed.stdout and "ci-agent" in listed.stdout
    assert secret not in listed.stdout
    quiet = ratchet("create", "reader", "--scope", "read", "-q")
    assert quiet.exit_code == 0 and quiet.stdout.strip().startswith("rt_")
    denied = ratchet("list", token=secret)
    assert denied.exit_code == 1 and "'admin' scope" in denied.output and "HTTP 403" in denied.output
    anonymous = ratchet("list", token=None)
    assert anonymous.exit_code == 1 and "RATCHET_TOKEN" in anonymous.output
    revoked = ratchet("revoke", token_id)
    assert revoked.exit_code == 0, revoked.output
    assert call(secured, "GET", "/v1/loops", secret).status_code == 401


def test_metrics_protection_is_a_setting(server_factory):
    srv = server_factory(slots=1, env={**SECURED, "RATCHET_METRICS_AUTH": "true"})
    reader = make_token(srv, "prometheus", ["read"])["secret"]
    assert call(srv, "GET", "/metrics").status_code == 401
    r = call(srv, "GET", "/metrics", reader)
    assert r.status_code == 200 and "ratchet_slots_total" in r.text
    assert call(srv, "GET", "/healthz").status_code == 200


def test_auth_mode_defaults():
    assert auth_mode(Settings(host="127.0.0.1")) == "none"
    assert auth_mode(Settings(host="::1")) == "none"
    assert auth_mode(Settings(host="localhost")) == "none"
    assert auth_mode(Settings(host="0.0.0.0")) == "tokens"
    assert auth_mode(Settings(host="ratchet.example")) == "tokens"
    assert auth_mode(Settings(host="127.0.0.1", auth="tokens")) == "tokens"
    with pytest.raises(SettingsError, match="RATCHET_AUTH_NONE_ON_NETWORK"):
        auth_mode(Settings(host="0.0.0.0", auth="none"))
    assert auth_mode(Settings(host="0.0.0.0", auth="none", auth_none_on_network=True)) == "none"


def test_serve_refuses_auth_none_on_a_network_address_without_opt_in(tmp_path):
    result = CliRunner().invoke(
        cli, ["serve", "--host", "0.0.0.0", "--auth", "none", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2 and "RATCHET_AUTH_NONE_ON_NETWORK" in result.output
    short = CliRunner().invoke(cli, ["serve", "--admin-token", "short", "--data-dir", str(tmp_path)])
    assert short.exit_code == 2 and "admin_token" in short.output


def test_auth_none_on_a_network_address_is_logged_loudly(caplog):
    caplog.set_level(logging.INFO, logger="ratchet")
    _log_auth(Settings(host="0.0.0.0", auth="none", auth_none_on_network=True), "none")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "AUTH IS OFF on 0.0.0.0" in caplog.text and "run code" in caplog.text
    caplog.clear()
    _log_auth(Settings(host="127.0.0.1"), "none")
    assert [r.levelname for r in caplog.records] == ["INFO"]
