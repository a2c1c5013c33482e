"""The status pages in a real browser: Debian's headless chromium, driven by playwright, against
a running cluster (docker-registry with htpasswd, tracker, origin, agent). The origin's page is
behind the operator sign-in (no session: a redirect to it, and 401 for its JSON); it loads without
console errors; its plots and tiles show the numbers its JSON has; its audit search finds a pull
made here, by a registry user whose name is HTML (shown as text, never run), in the table and in
the CSV download. The agent's page shows counts only. A screenshot of the origin's page is kept
(SHOAL_SCREENSHOT_DIR, or the test's directory)."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Response, sync_playwright

from shoal import protocol
from tests.e2e.conftest import USERS
from tests.support import api
from tests.support.images import Image, build_image, push
from tests.support.procs import ROOT, Component, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

CHROMIUM = "/usr/bin/chromium"
MIB = 1 << 20
REPO = "page/app"
# A registry user whose name is markup: the audit shows principals, which clients choose
HOSTILE = '<img src=x onerror="window.__pwned=1">"&amp;<b>eve</b>'
HOSTILE_PASSWORD = "evepw"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"

if not os.path.exists(CHROMIUM):
    raise RuntimeError("chromium is not installed: run ./bin/test, which installs the Debian packages")


@pytest.fixture(scope="module")
def page_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("page-registry"), users={**USERS, HOSTILE: HOSTILE_PASSWORD})
    reg.start()
    yield reg
    reg.close()


@pytest.fixture
def page_stack(tmp_path: Path, page_registry: Registry) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", page_registry, node_user=("node", USERS["node"]),
              seeder_user=("seeder", USERS["seeder"]))
    yield s
    s.close()


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless (playwright's sync API runs an event loop in this thread while
    it is open: the tests' asyncio helpers are called before)."""
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Every console message and uncaught page error of a page."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _message(self, msg: ConsoleMessage) -> None:
        self.messages.append(f"{msg.type}: {msg.text}")
        if msg.type in ("error", "warning"):
            self.errors.append(f"{msg.type}: {msg.text}")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pull(agent: Component, registry: Registry, image: Image, authorization: str) -> int:
    """The image's manifest and blobs through the agent, as `authorization`'s user; each blob
    hashed against its digest. Returns the blob bytes."""
    def get(path: str, accept: str | None = None) -> bytes:
        headers = {"Authorization": authorization, **({"Accept": accept} if accept else {})}
        req = urllib.request.Request(f"{agent.url}{path}?ns={registry.host}", headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return bytes(resp.read())

    manifest = json.loads(get(f"/v2/{REPO}/manifests/{image.tag}", MANIFEST))
    total = 0
    for desc in [manifest["config"], *manifest["layers"]]:
        body = get(f"/v2/{REPO}/blobs/{desc['digest']}")
        assert "sha256:" + hashlib.sha256(body).hexdigest() == desc["digest"]
        total += len(body)
    return total


def overview_api(origin: Component, token: str) -> dict[str, Any]:
    """The origin's page JSON as a script reads it, with an operator token."""
    req = urllib.request.Request(origin.url + protocol.PAGE_OVERVIEW.pattern,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def overview_of(page: Page, url: str) -> dict[str, Any]:
    """Load `url` and return the overview JSON the page drew, once it has drawn it."""
    with page.expect_response(lambda r: r.url.endswith(protocol.PAGE_OVERVIEW.pattern) and r.ok) as answer:
        page.goto(url)
    response: Response = answer.value
    doc: dict[str, Any] = response.json()
    page.wait_for_function("(now) => document.body.getAttribute('data-generated') === String(now)", arg=doc["now"],
                           timeout=15_000)
    return doc


DRAWN = """() => {
  const attrs = (sel, ...names) => [...document.querySelectorAll(sel)].map(
      (e) => Object.fromEntries(names.map((n) => [n, e.getAttribute(n)])));
  return {
    generated: document.body.getAttribute('data-generated'),
    tiles: Object.fromEntries([...document.querySelectorAll('.tile')].map((t) => [t.id, t.getAttribute('data-value')])),
    totals: Object.fromEntries(attrs('#served-totals [data-source]', 'data-source', 'data-value')
                               .map((a) => [a['data-source'], a['data-value']])),
    lines: attrs('#served-chart polyline', 'data-series', 'data-last', 'data-last-t', 'data-points'),
    samples: document.querySelector('#served-chart svg').getAttribute('data-samples'),
    bars: Object.fromEntries([...document.querySelectorAll('.bars')].map((b) => [b.id,
        Object.fromEntries(attrs('#' + b.id + ' .bar', 'data-label', 'data-value')
                           .map((a) => [a['data-label'], a['data-value']]))])),
  };
}"""


def drawn(page: Page, doc: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = page.evaluate(DRAWN)
    assert shown["generated"] == str(doc["now"]) or float(shown["generated"]) == doc["now"], \
        "the page refreshed while it was read"
    return shown


def check_served_plot(shown: dict[str, Any], doc: dict[str, Any]) -> None:
    """The served-bytes chart and totals are the JSON's numbers."""
    history = doc["history"]
    assert int(shown["samples"]) == len(history["t"]) >= 1
    assert {line["data-series"] for line in shown["lines"]} == {"served_cache", "served_peers", "served_registry"}
    for line in shown["lines"]:
        values = history["series"][line["data-series"]]
        assert float(line["data-last"]) == values[-1]
        assert float(line["data-last-t"]) == history["t"][-1]
        assert int(line["data-points"]) == len(values) - 1  # rates between samples
    assert {k: int(v) for k, v in shown["totals"].items()} == doc["served"]


def test_origin_and_agent_pages_in_chromium(page_stack: Stack, page_registry: Registry, tmp_path: Path) -> None:
    stack = page_stack
    image = build_image(tmp_path / "image", tag="v1", layer_sizes=[3 * MIB + 17, 150_000], seed=17)
    push(image, registry=page_registry.host, repo=REPO, user="alice", password=USERS["alice"])
    stack.start(agents=1)
    origin, agent = stack.origin, stack.agents[0]
    assert origin is not None
    image_name = f"{page_registry.host}/{REPO}"

    # a pull through the agent by the user whose name is HTML, and a pre-seed job
    pulled = pull(agent, page_registry, image, basic(HOSTILE, HOSTILE_PASSWORD))
    job = api.preseed(origin.url, stack.operator_token, f"{image_name}:v1")
    wait_for(lambda: api.preseed_job(origin.url, stack.operator_token, job.id).finished, timeout=60, what="pre-seed")
    stack.journal(agent, minimum=3)  # manifest and two blobs, collected
    # the same pull again, between two samples: cache hits, so the plots have something to draw
    def sampled() -> int:
        return len(overview_api(origin, stack.operator_token)["history"]["t"])

    samples = sampled()
    wait_for(lambda: sampled() > samples, timeout=20, what="a sample")
    pulled += pull(agent, page_registry, image, basic(HOSTILE, HOSTILE_PASSWORD))
    stack.journal(agent, minimum=6)
    wait_for(lambda: sampled() > samples + 1, timeout=20, what="a sample")
    with chromium() as browser:
        check_pages(browser, stack, agent, page_registry, image, pulled, job.id, tmp_path)


def check_pages(browser: Browser, stack: Stack, agent: Component, page_registry: Registry, image: Image,
                pulled: int, job_id: str, tmp_path: Path) -> None:
    origin = stack.origin
    assert origin is not None
    image_name = f"{page_registry.host}/{REPO}"
    big = max(image.blobs.values(), key=lambda b: b.size).digest
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    console = Console(page)

    # --- without a session: the sign-in, and 401 for the page's JSON -----------------------------
    assert page.request.get(origin.url + protocol.PAGE.pattern, max_redirects=0).status == 303
    for route in (protocol.PAGE_OVERVIEW, protocol.PAGE_AUDIT):
        assert page.request.get(origin.url + route.pattern).status == 401
    page.goto(origin.url + "/")
    assert page.url == origin.url + protocol.PAGE_SIGNIN_FORM.pattern
    page.fill("input[name=token]", "shoal-op-not-a-real-token")
    page.click("#signin button[type=submit]")
    assert "not an operator" in page.inner_text("#signin-error")
    # (the refused sign-in's 401 is the one console error expected here: the browser reports it)
    assert [e for e in console.errors if "401" not in e] == []
    console.errors.clear()
    # a form posted from another site is refused (login CSRF)
    forged = page.request.post(origin.url + protocol.PAGE_SIGNIN.pattern, form={"token": stack.operator_token},
                               headers={"Origin": "http://evil.example"}, max_redirects=0)
    assert forged.status == 403
    assert not context.cookies()

    # --- sign in: an HttpOnly, SameSite=Strict session cookie ------------------------------------
    page.fill("input[name=token]", stack.operator_token)
    with page.expect_response(lambda r: r.url.endswith(protocol.PAGE_OVERVIEW.pattern)):
        page.click("#signin button[type=submit]")
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    # the cookie opens the page's GET routes only, never the API
    assert page.request.post(origin.url + protocol.PRESEED.pattern,
                             data={"images": [f"{image_name}:v1"]}).status == 401
    assert page.request.get(origin.url + protocol.AUDIT.pattern).status == 401

    shell = page.request.get(origin.url + "/")
    csp = shell.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert shell.headers["x-content-type-options"] == "nosniff"

    # --- the overview: plots and tiles are the JSON's numbers ------------------------------------
    doc = overview_of(page, origin.url + "/")
    shown = drawn(page, doc)
    check_served_plot(shown, doc)
    assert sum(doc["served"].values()) >= pulled
    assert int(shown["tiles"]["tile-torrents"]) == doc["swarm"]["torrents"] >= 1
    assert int(shown["tiles"]["tile-peers"]) == doc["swarm"]["peers_connected"]
    assert int(shown["tiles"]["tile-saved"]) == doc["registry"]["saved_bytes"]
    assert int(shown["tiles"]["tile-fetched"]) == doc["registry"]["fetched_bytes"] > 0
    assert int(shown["tiles"]["tile-cache"]) == doc["cache"]["bytes"] > 0
    for bars in ("admissions", "seeds"):
        assert {k: int(v) for k, v in shown["bars"][bars].items()} == doc[bars]
    assert {k: int(v) for k, v in shown["bars"]["fallbacks"].items()} == doc["registry_by_node"]
    # the same numbers as the API a script would read with the operator token
    assert overview_api(origin, stack.operator_token)["served"] == doc["served"]
    assert doc["served"]["cache"] > 0 and doc["registry"]["saved_bytes"] > 0  # the second pull
    assert any(int(line["data-points"]) >= 2 for line in shown["lines"])
    # the pre-seed job, with its progress
    row = page.locator(f"#jobs tr[data-job='{job_id}']")
    assert row.locator("td").nth(3).inner_text() == "done"
    (listed,) = [j for j in doc["jobs"] if j["id"] == job_id]
    assert row.locator("progress").get_attribute("value") == str(listed["bytes_done"])
    assert listed["bytes_done"] == listed["bytes_total"] > 0

    # --- the audit search finds the pull, the principal shown as text ----------------------------
    page.fill("#audit-form input[name=image]", image_name)
    page.fill("#audit-form input[name=principal]", HOSTILE)
    with page.expect_response(lambda r: protocol.PAGE_AUDIT.pattern in r.url and "format=json" in r.url) as found:
        page.click("#audit-form button[type=submit]")
    events = found.value.json()["events"]
    assert len(events) >= 6 and all(e["principal"] == HOSTILE for e in events)
    page.wait_for_function("(n) => document.querySelector('#audit').getAttribute('data-count') === String(n)",
                           arg=len(events))
    rows = page.locator("#audit tbody tr")
    assert rows.count() == len(events)
    blob_rows = page.locator("#audit tbody tr", has_text=big)
    assert blob_rows.count() == 2
    cells = blob_rows.first.locator("td").all_inner_texts()
    assert cells[2] == HOSTILE and cells[3] == image_name
    assert page.locator("#audit img, #audit b").count() == 0  # the markup stayed text
    assert page.evaluate("() => window.__pwned") is None
    # the CSV download holds the same rows
    with page.expect_download() as download:
        page.click("#audit-csv")
    saved = Path(download.value.path())
    table = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert {r["event_id"] for r in table} == {e["event_id"] for e in events}
    layers = [r for r in table if r["digest"] == big]
    assert len(layers) == 2  # pulled twice
    assert all(r["principal"] == HOSTILE and r["repository"] == REPO and r["ns"] == page_registry.host
               for r in layers)

    screenshot(page, tmp_path / "status-page.png")

    # --- sign out: the session is gone ----------------------------------------------------------
    page.click("header form.who button[type=submit]")
    page.wait_for_url(origin.url + protocol.PAGE_SIGNIN_FORM.pattern)
    assert page.request.get(origin.url + protocol.PAGE_OVERVIEW.pattern).status == 401

    # --- the agent's page: counts only, no image names, no principals ---------------------------
    agent_doc = overview_of(page, agent.url + "/")
    agent_shown = drawn(page, agent_doc)
    check_served_plot(agent_shown, agent_doc)
    assert sum(agent_doc["served"].values()) >= pulled
    assert int(agent_shown["tiles"]["tile-misses"]) == agent_doc["requests"]["misses"] >= 2
    assert int(agent_shown["tiles"]["tile-blobs"]) == agent_doc["cache"]["blobs"] >= 2
    assert {k: int(v) for k, v in agent_shown["bars"]["fallbacks"].items()} == agent_doc["fallbacks"]
    assert "not_admitted" in agent_doc["fallbacks"]  # every reason listed, zero or not
    text = page.content() + json.dumps(agent_doc)
    assert REPO not in text and "eve</b>" not in text and "eve&lt;" not in text and big not in text

    screenshot(page, tmp_path / "agent-status-page.png")
    assert console.errors == [], console.messages
    context.close()


def screenshot(page: Page, path: Path) -> None:
    """Into the test's directory, and SHOAL_SCREENSHOT_DIR if set (docs/ keeps the origin's)."""
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SHOAL_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["SHOAL_SCREENSHOT_DIR"]) / path.name)


def shoal_origin(stack: Stack, *args: str) -> str:
    """`shoal-origin add-operator` / `remove-operator`, as an administrator runs them."""
    done = subprocess.run([sys.executable, "-m", "shoal_origin", *args, "--operators", str(stack.keys["operators"])],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sign_in_by_role_by_registry_login_and_a_removed_token_ends_its_session(page_stack: Stack,
                                                                          page_registry: Registry) -> None:
    stack = page_stack
    stack.start_tracker()
    origin = stack.start_origin(operators={"registry": {"upstream": page_registry.host,
                                                        "roles": {"alice": ["audit"]}}})
    auditor = shoal_origin(stack, "add-operator", "auditor", "--roles", "audit")
    seeder = shoal_origin(stack, "add-operator", "ci", "--roles", "seed", "--repositories", "x/*")
    with chromium() as browser:
        context = browser.new_context()
        page = context.new_page()
        console = Console(page)
        signin = origin.url + protocol.PAGE_SIGNIN_FORM.pattern
        # a seed operator holds no audit role: not signed in, no cookie
        page.goto(signin)
        page.fill("input[name=token]", seeder)
        page.click("#signin button[type=submit]")
        assert "not an operator" in page.inner_text("#signin-error")
        assert not context.cookies()
        console.errors.clear()  # (the refused sign-in's 401)

        page.goto(signin)
        page.fill("input[name=token]", auditor)
        with page.expect_response(lambda r: r.url.endswith(protocol.PAGE_OVERVIEW.pattern) and r.ok):
            page.click("#signin button[type=submit]")
        assert page.inner_text("#principal") == "token:auditor"
        overview = page.request.get(origin.url + protocol.PAGE_OVERVIEW.pattern)
        assert overview.status == 200
        assert overview.json()["jobs"] is None  # as GET /v1/preseed/{job}: not for the audit role
        assert "seed role" in page.inner_text("#jobs")
        assert console.errors == [], console.messages

        # the operator is removed: the session's next request is refused, and the session is gone
        shoal_origin(stack, "remove-operator", "auditor")
        wait_for(lambda: page.request.get(origin.url + protocol.PAGE_OVERVIEW.pattern).status == 401, timeout=10,
                 what="the session refused")
        page.goto(origin.url + "/")
        assert page.url == signin

        # a registry login: a wrong password refused as any other credential, alice's taken
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", "wrong")
        page.click("#signin button[type=submit]")
        assert "not an operator" in page.inner_text("#signin-error")
        console.errors.clear()
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", USERS["alice"])
        with page.expect_response(lambda r: r.url.endswith(protocol.PAGE_OVERVIEW.pattern) and r.ok):
            page.click("#signin button[type=submit]")
        assert page.inner_text("#principal") == "alice"
        assert console.errors == [], console.messages
        context.close()
