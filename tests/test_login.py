"""The browser login (/login) against a real service with tokens on, in headless Chromium (the
driver of tests/test_web.py): a page without a cookie answers 401 with a link to /login; after
logging in with a read token it renders (chart, logs and diffs included); once the token is revoked
it does not. The cookie's flags, CSRF, and the limits of a cookie (reads only) over plain HTTP."""

from __future__ import annotations

import re
import secrets
import sqlite3

import httpx
import pytest
from test_api import make_loop, submit
from test_web import browser  # noqa: F401 - the fixture

ADMIN = "admin-" + secrets.token_hex(16)
SECURED = {"RATCHET_AUTH": "tokens", "RATCHET_ADMIN_TOKEN": ADMIN}


@pytest.fixture
def secured(server_factory):
    srv = server_factory(slots=1, env=SECURED)
    srv.client.headers["Authorization"] = f"Bearer {ADMIN}"
    return srv


def _token(srv, name: str, scopes: list[str]) -> dict:
    r = srv.client.post("/v1/tokens", json={"name": name, "scopes": scopes})
    assert r.status_code == 201, r.text
    return r.json()


def _sessions(srv) -> int:
    with sqlite3.connect(srv.data_dir / "ratchet.db") as db:
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]


def test_login_flow_in_chromium(secured, browser):  # noqa: F811 - the fixture
    loop = make_loop(secured, name="watched")
    lid = loop["id"]
    secured.wait_idle(lid)
    cand = submit(
        secured, lid, "smaller V", patch="--- a/train.py\n+++ b/train.py\n@@ -2 +2 @@\n-V = 1.0\n+V = 0.5\n"
    )
    secured.wait_final(cand["id"])
    reader = _token(secured, "viewer", ["read"])

    page = browser.new_page()
    response = page.goto(f"{secured.url}/loops/{lid}")
    assert response.status == 401
    link = page.locator("#login-link")
    assert link.get_attribute("href") == f"/login?next=/loops/{lid}"
    link.click()
    page.wait_for_selector("input[name=token]")
    page.fill("input[name=token]", reader["secret"])
    page.click("button[type=submit]")
    page.wait_for_url(f"**/loops/{lid}")
    assert page.title() == "watched · Ratchet"
    assert page.locator("#experiments tbody tr").count() == 2
    page.wait_for_function("() => document.getElementById('chart').complete")
    assert page.evaluate("() => document.getElementById('chart').naturalWidth") > 0  # the chart, by cookie

    cookies = {c["name"]: c for c in browser.cookies()}
    session = cookies["ratchet_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert not session["secure"]  # plain http to 127.0.0.1: the loopback exception
    assert reader["secret"] not in session["value"]
    assert _sessions(secured) == 1

    # what the page links to works with the cookie; writes never do
    hrefs = page.locator(f"#x-{cand['id']} td.links a").evaluate_all("els => els.map(a => a.href)")
    for href in hrefs:
        assert browser.request.get(href).status == 200, href
    pause = browser.request.post(f"{secured.url}/v1/loops/{lid}/pause")
    assert pause.status == 401
    assert secured.client.get(f"/v1/loops/{lid}").json()["state"] == "active"
    assert browser.request.get(f"{secured.url}/v1/tokens").status == 401  # admin reads neither

    # a login form posted without its CSRF token is refused
    forged = browser.request.post(f"{secured.url}/login", form={"token": ADMIN, "next": "/loops"})
    assert forged.status == 403 and "Form expired" in forged.text()

    # the token is revoked: the page no longer renders, and the session is gone
    assert secured.client.delete(f"/v1/tokens/{reader['id']}").status_code == 204
    assert _sessions(secured) == 0
    response = page.reload()
    assert response.status == 401 and page.locator("#login-link").count() == 1
    assert page.locator("#experiments").count() == 0


def test_login_refusals_and_logout(secured):
    client = httpx.Client(base_url=secured.url)
    form = client.get("/login", params={"next": "//evil.example/x"})
    csrf = re.search(r'name="_csrf_token" value="([0-9a-f]+)"', form.text).group(1)
    assert 'name="next" value="/loops"' in form.text  # an off-site next is dropped

    submitter = _token(secured, "agent", ["submit"])
    r = client.post("/login", data={"token": submitter["secret"], "_csrf_token": csrf})
    assert r.status_code == 403 and "may not read" in r.text
    r = client.post("/login", data={"token": "rt_" + "x" * 40, "_csrf_token": csrf})
    assert r.status_code == 401 and "unknown or revoked" in r.text
    assert "ratchet_session" not in client.cookies

    r = client.post("/login", data={"token": ADMIN, "_csrf_token": csrf, "next": "/loops"})
    assert r.status_code == 303 and r.headers["location"] == "/loops"
    first = client.cookies["ratchet_session"]
    assert client.get("/loops").status_code == 200
    # a second login gets a new session id (no fixation), and the old one is gone
    r = client.post("/login", data={"token": ADMIN, "_csrf_token": csrf, "next": "/loops"})
    assert client.cookies["ratchet_session"] != first and _sessions(secured) == 1

    # an API call with a bearer token is unaffected by any cookie
    assert (
        httpx.get(f"{secured.url}/v1/loops", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    )
    # log out: CSRF-checked form, the session ends
    logout = client.get("/logout")
    csrf2 = re.search(r'name="_csrf_token" value="([0-9a-f]+)"', logout.text).group(1)
    assert client.post("/logout", data={}).status_code == 403
    r = client.post("/logout", data={"_csrf_token": csrf2})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert _sessions(secured) == 0 and client.get("/loops").status_code == 401


def test_cookie_is_secure_over_https_and_login_needs_it_off_loopback(secured):
    """uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (a TLS proxy on the same host)."""
    client = httpx.Client(base_url=secured.url, headers={"X-Forwarded-Proto": "https"})
    form = client.get("/login")
    csrf = re.search(r'name="_csrf_token" value="([0-9a-f]+)"', form.text).group(1)
    r = client.post("/login", data={"token": ADMIN, "_csrf_token": csrf})
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "ratchet_session=" in v)
    assert (
        "Secure" in cookie
        and "HttpOnly" in cookie
        and "SameSite=strict" in cookie.replace("Strict", "strict")
    )

    # plain http to a host name that is not loopback: the cookie would travel in clear, so no login
    plain = httpx.get(f"{secured.url}/login", headers={"Host": "ratchet.example"})
    assert plain.status_code == 400 and "https" in plain.text and "RATCHET_COOKIE_SECURE" in plain.text


def test_pages_need_no_login_without_tokens(server):
    r = httpx.get(f"{server.url}/login", params={"next": "/loops"}, follow_redirects=False)
    assert r.status_code in (302, 303, 307) and r.headers["location"] == "/loops"
    assert httpx.get(f"{server.url}/loops").status_code == 200
