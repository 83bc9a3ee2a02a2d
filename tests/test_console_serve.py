"""How `dedup console` serves its pages, without a browser: HTTPS with the session cookie's
flags, plain HTTP refused off loopback, the headers of every response, idle sessions ended,
and an unauthenticated development server signed in to without a token."""

from __future__ import annotations

import http.cookiejar
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from console_fixtures import ConsoleProcess

from dedup.console.sessions import SessionStore

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def console_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedup", "console", *args],
                          capture_output=True, text=True, timeout=60)


def test_plain_http_is_refused_off_loopback(keys):
    refused = console_command("--address", "0.0.0.0:0", "--ca", str(keys / "ca.crt"))
    assert refused.returncode == 1
    assert "plain HTTP only on loopback" in refused.stderr
    assert "--certificate and --private-key" in refused.stderr
    unauthenticated = console_command("--address", "0.0.0.0:0", "--certificate",
                                      str(keys / "server.crt"), "--private-key",
                                      str(keys / "server.key"))
    assert unauthenticated.returncode == 1 and "without --ca" in unauthenticated.stderr
    bad_template = console_command("--ca", str(keys / "ca.crt"), "--photo-url-template",
                                   "https://bss.example/photos")
    assert bad_template.returncode == 1 and "{registration_id}" in bad_template.stderr


class Client:
    """A browser-like HTTP client: cookies kept, redirects followed, the CSRF token read."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.cookies)]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def get(self, path: str):
        return self.opener.open(self.base + path, timeout=30)

    def post(self, path: str, fields: dict[str, str]):
        data = urllib.parse.urlencode(fields).encode()
        try:
            return self.opener.open(self.base + path, data=data, timeout=30)
        except urllib.error.HTTPError as error:
            return error


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def signed_in(url: str, case_id: str, token: str = "") -> Client:
    """A client of the console at `url` signed in (with `token`; none for a development
    server) with case `case_id` open."""
    client = Client(url)
    page = client.get("/signin").read().decode()
    fields = {"csrf": csrf_of(page)} | ({"token": token} if token else {})
    text = client.post("/signin", fields).read().decode()
    client.post("/case", {"csrf": csrf_of(text), "case_id": case_id, "purpose": "a test"})
    return client


def test_https_sets_a_secure_host_only_cookie_and_strict_headers(keys):
    console = ConsoleProcess("--server", "127.0.0.1:9", "--ca", str(keys / "ca.crt"),
                             "--certificate", str(keys / "server.crt"),
                             "--private-key", str(keys / "server.key"))
    try:
        assert console.url.startswith("https://")
        client = Client(console.url, ssl.create_default_context(cafile=str(keys / "ca.crt")))
        reply = client.get("/signin")
        cookie = reply.headers["Set-Cookie"]  # the sign-in form's nonce (no session yet)
        assert cookie.startswith("__Host-dedup-console-sign-in=")
        for flag in ("HttpOnly", "Secure", "SameSite=lax", "Path=/"):
            assert flag in cookie
        assert reply.headers["Content-Security-Policy"] == CSP
        assert reply.headers["Cache-Control"] == "no-store"
        assert reply.headers["Strict-Transport-Security"].startswith("max-age=")
        page = reply.read().decode()
        # The server is not there: the sign-in says so, as a message without a stack trace.
        refused = client.post("/signin", {"csrf": csrf_of(page), "token": "a-token"})
        text = refused.read().decode()
        assert refused.status == 502 and "cannot be reached" in text
        assert "Traceback" not in text and "a-token" not in text
        # Nothing of the console's insides to someone not signed in: no address, no TLS.
        assert "127.0.0.1:9" not in text and "ipv4" not in text and "UNAVAILABLE" not in text
    finally:
        console.stop()


def test_every_page_has_the_headers_and_static_files_are_cacheable(keys):
    console = ConsoleProcess("--server", "127.0.0.1:9", "--ca", str(keys / "ca.crt"),
                             "--photo-url-template", "https://bss.example:8443/p/{registration_id}")
    try:
        client = Client(console.url)
        page = client.get("/signin")
        assert page.headers["Content-Security-Policy"] == CSP.replace(
            "img-src 'self'", "img-src 'self' https://bss.example:8443")
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        cookie = page.headers["Set-Cookie"]
        assert cookie.startswith("dedup-console-sign-in=") and "Secure" not in cookie
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "<script>" not in page.read().decode()  # no inline script
        static = client.get("/static/console.js")
        assert static.headers["Cache-Control"].startswith("private, max-age=")
        # A page that needs a session sends the person to sign in, never shows data.
        assert urllib.parse.urlsplit(client.get("/links?id_number=X").url).path == "/signin"
        no_session = Client(console.url).post("/case", {"case_id": "C", "purpose": "P"})
        assert no_session.url.endswith("/signin?ended=1")
    finally:
        console.stop()


def test_an_idle_session_ends_and_polling_does_not_keep_it_alive():
    store = SessionStore(idle_timeout_s=0.3, lifetime_s=60)
    session = store.sign_in("the-bearer-token", "investigator")
    time.sleep(0.2)
    assert store.get(session.id) is session  # the person's request: the clock starts again
    time.sleep(0.2)
    assert store.get(session.id, touch=False) is session  # a page's poll
    time.sleep(0.2)
    assert store.get(session.id) is None
    assert session.token is None  # forgotten with the session


def test_a_token_signing_in_again_and_again_ends_its_own_oldest_sessions():
    """Each session may hold a probe photo and sweeps running on the server: a token signed
    in over and over (an insider's script) kept every one until it expired (12 hours)."""
    store = SessionStore(idle_timeout_s=60, lifetime_s=60)
    other = store.sign_in("another-token", "investigator")
    mine = [store.sign_in("the-bearer-token", "investigator")
            for _ in range(3 * SessionStore.SESSIONS_A_TOKEN)]
    assert len(store) == SessionStore.SESSIONS_A_TOKEN + 1
    kept = mine[-SessionStore.SESSIONS_A_TOKEN:]
    assert all(store.get(session.id) is session for session in [*kept, other])
    assert all(store.get(session.id) is None and session.token is None
               for session in mine[:-SessionStore.SESSIONS_A_TOKEN])
    # Without authentication every session's token is None: everyone's, not one token's.
    local = [store.sign_in(None, "admin") for _ in range(2 * SessionStore.SESSIONS_A_TOKEN)]
    assert all(store.get(session.id) is session for session in local)


@pytest.mark.embedded_only(reason="the console is a gRPC client; which backend answers does "
                           "not change what it sends")
def test_an_unauthenticated_development_server_needs_no_token(server):
    console = ConsoleProcess("--server", f"127.0.0.1:{server.port}")
    try:
        client = Client(console.url)
        page = client.get("/signin").read().decode()
        assert "sign in without a token" in page
        case_page = client.post("/signin", {"csrf": csrf_of(page)})
        assert case_page.url.endswith("/case")
        text = case_page.read().decode()
        assert "unauthenticated development server" in text
        admin = client.post("/case", {"csrf": csrf_of(text), "case_id": "C-1",
                                      "purpose": "local test"})
        assert admin.url.endswith("/search")
        dashboard = client.get("/admin").read().decode()
        assert "registrations" in dashboard and "C-1" in dashboard
    finally:
        console.stop()


def _get_as(url: str, host: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "/signin", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_plain_http_answers_loopback_names_only(keys):
    """A page of another site whose name it made resolve to 127.0.0.1 (DNS rebinding) sends
    its own name as Host: refused, so it cannot read the console as its own origin."""
    console = ConsoleProcess("--server", "127.0.0.1:9", "--ca", str(keys / "ca.crt"))
    try:
        port = urllib.parse.urlsplit(console.url).port
        assert _get_as(console.url, f"evil.example:{port}")[0] == 421
        assert _get_as(console.url, "evil.example")[0] == 421
        assert _get_as(console.url, f"127.0.0.1.evil.example:{port}")[0] == 421
        for name in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "localhost.",
                     f"[::1]:{port}", "127.0.0.2"):
            status, page = _get_as(console.url, name)
            assert status == 200 and "csrf" in page, name
    finally:
        console.stop()


def _asgi(app, method: str, path: str, cookies: str = "", body: bytes = b""
          ) -> tuple[int, dict[str, str], str]:
    """One request to the console's ASGI app in this process: status, headers, body."""
    import asyncio

    sent: list[dict] = []
    headers = [(b"host", b"127.0.0.1:8080"), (b"cookie", cookies.encode())]
    if body:
        headers.append((b"content-type", b"application/x-www-form-urlencoded"))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "scheme": "http",
             "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 5555),
             "http_version": "1.1", "root_path": ""}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    reply_headers: dict[str, str] = {}
    for name, value in start["headers"]:
        reply_headers.setdefault(name.decode(), value.decode())
    text = b"".join(message.get("body", b"") for message in sent
                    if message["type"] == "http.response.body").decode()
    return start["status"], reply_headers, text


def test_a_flood_of_sign_in_pages_costs_the_console_nothing_and_ends_no_one():
    """A sign-in page keeps no session: its CSRF token is a MAC of a nonce in a cookie of
    its own. A flood of them (any site can send them to a loopback console) keeps nothing,
    so it cannot fill memory nor end an investigator's sign-in in progress (before, each kept
    a session: memory, then with a cap the oldest ended); a sign-in form posted with another
    page's nonce is refused."""
    from dedup.console.app import create_app
    from dedup.console.settings import ConsoleSettings

    app = create_app(ConsoleSettings(server="127.0.0.1:9"))
    sessions = app.state.console.sessions
    status, headers, page = _asgi(app, "GET", "/signin")
    nonce_cookie = headers["set-cookie"].split(";")[0]
    assert status == 200 and nonce_cookie.startswith("dedup-console-sign-in=")
    for _ in range(300):
        assert _asgi(app, "GET", "/signin")[0] == 200
    assert len(sessions) == 0
    again = _asgi(app, "GET", "/signin", cookies=nonce_cookie)[2]
    assert csrf_of(again) == csrf_of(page)  # the same nonce, the same token
    other = _asgi(app, "GET", "/signin")[1]["set-cookie"].split(";")[0]
    refused = _asgi(app, "POST", "/signin", cookies=other,
                    body=urllib.parse.urlencode({"csrf": csrf_of(page)}).encode())
    assert refused[0] == 403 and "Form refused" in refused[2]


@pytest.mark.embedded_only(reason="the console is a gRPC client; which backend answers does "
                           "not change what it sends")
def test_a_settlement_is_marked_for_its_session_and_case_only(server):
    """Investigator A settles a pair in case C-A: A's links page marks it; investigator B
    (case C-B) sees no mark, nor does A once another case is open (the marks were one store
    for the whole console: B learned A's decision, unaudited)."""
    from conftest import enroll

    from dedup import FaceGenerator

    people = FaceGenerator(31)
    person = people.persons(1)[0]
    enroll(server.stub, "r-one", "ID-ONE", people.capture(person))
    enroll(server.stub, "r-two", "ID-TWO", people.capture(person))
    console = ConsoleProcess("--server", f"127.0.0.1:{server.port}")

    def with_case(case_id: str) -> tuple[Client, str]:
        client = signed_in(console.url, case_id)
        return client, csrf_of(client.get("/case").read().decode())

    def marked(client: Client) -> bool:
        return "settled: same person" in client.get("/links?id_number=ID-ONE").read().decode()

    try:
        a, a_csrf = with_case("C-A")
        b, _ = with_case("C-B")
        assert not marked(a)
        done = a.post("/adjudicate", {"csrf": a_csrf, "registration_id": "r-one",
                                      "matched_registration_id": "r-two", "decision": "same",
                                      "note": "", "score": "", "confirmed": "yes"})
        assert done.status == 200, done.read().decode()
        assert marked(a)
        assert not marked(b)
        a.post("/case", {"csrf": a_csrf, "case_id": "C-A2", "purpose": "another"})
        assert not marked(a)
    finally:
        console.stop()


@pytest.mark.embedded_only(reason="the audit pages read an embedded data directory here")
def test_the_audit_page_asks_the_server_about_the_token_on_every_read(server):
    """The audit trail is read from the data directory, not through the server: each read
    asks the server about the admin's token first, so a token expired or revoked since
    sign-in (here: a server that no longer answers) reads nothing more."""
    console = ConsoleProcess("--server", f"127.0.0.1:{server.port}",
                             "--audit-data-dir", str(server.config.store.data_dir))
    try:
        client = signed_in(console.url, "C-1")
        shown = client.get("/admin/audit")
        assert shown.status == 200 and 'id="verification"' in shown.read().decode()
        server.stop()
        try:
            refused = client.get("/admin/audit")
            status, text = refused.status, refused.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        assert status == 502 and 'id="verification"' not in text, text
    finally:
        console.stop()


def test_expired_sessions_are_ended_by_the_purge_even_when_one_fails_to():
    """The purging thread ends every expired session, its token with it, even when ending
    one fails (a sweep that does not cancel): before, that failure ended the thread, and
    every later expired session kept its token in memory until its cookie came again."""

    class Stuck:
        def cancel(self) -> None:
            raise RuntimeError("injected: a sweep that does not cancel")

    store = SessionStore(idle_timeout_s=0.1, lifetime_s=60)
    store.PURGE_EVERY_S = 0.05
    first = store.sign_in("token-one", "investigator")
    first.jobs["J1"] = Stuck()
    time.sleep(0.4)
    second = store.sign_in("token-two", "investigator")
    deadline = time.monotonic() + 5
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(store) == 0
    assert first.token is None and second.token is None


@pytest.mark.embedded_only(reason="the console is a gRPC client; which backend answers does "
                           "not change what it sends")
def test_a_form_shown_under_one_case_is_refused_once_another_is_open(server):
    """A confirmation page shown under case C-A, then C-B opened in another tab: its Confirm
    is refused and sends nothing (it went out under C-B, a purpose the investigator never
    chose for it). A page of C-B posts; signing out takes a page of any case."""
    from conftest import enroll

    from dedup import FaceGenerator

    people = FaceGenerator(32)
    person = people.persons(1)[0]
    enroll(server.stub, "r-one", "ID-ONE", people.capture(person))
    enroll(server.stub, "r-two", "ID-TWO", people.capture(person))
    console = ConsoleProcess("--server", f"127.0.0.1:{server.port}")
    pair = {"registration_id": "r-one", "matched_registration_id": "r-two",
            "decision": "same", "note": "", "score": "", "confirmed": "yes"}
    try:
        client = signed_in(console.url, "C-A")
        under_a = csrf_of(client.get("/search").read().decode())
        client.post("/case", {"csrf": under_a, "case_id": "C-B", "purpose": "two"})
        refused = client.post("/adjudicate", {"csrf": under_a, **pair})
        assert refused.status == 403 and "another case" in refused.read().decode()
        assert "settled:" not in links_of(client)  # nothing was settled
        under_b = csrf_of(client.get("/search").read().decode())
        done = client.post("/adjudicate", {"csrf": under_b, **pair})
        assert done.status == 200 and "settled: same person" in links_of(client)
        signed_out = client.post("/signout", {"csrf": under_a})
        assert urllib.parse.urlsplit(signed_out.url).path == "/signin"
    finally:
        console.stop()


def links_of(client: Client) -> str:
    return client.get("/links?id_number=ID-ONE").read().decode()


@pytest.mark.embedded_only(reason="the console is a gRPC client; which backend answers does "
                           "not change what it sends")
def test_a_token_that_expires_after_sign_in_ends_the_session(make_server, keys, tmp_path):
    """The investigator's token expires 6 s after the server starts: the next page the server
    refuses as UNAUTHENTICATED ends the session and goes to the sign-in (before, the page
    showed the refusal and the session stayed, its token with it)."""
    from datetime import UTC, datetime, timedelta

    from secure import tokens

    from dedup.core.security import load_security

    expires = (datetime.now(UTC) + timedelta(seconds=6)).isoformat(timespec="seconds")
    lines, in_investigator = [], False
    for line in (keys / "security.toml").read_text().splitlines():
        if line.startswith("name = "):
            in_investigator = line == 'name = "investigator-token"'
        if in_investigator and line.startswith("expires"):
            line = f"expires = {expires}"
        lines.append(line)
    for name in ("server.crt", "server.key", "ca.crt", "audit.key"):
        (tmp_path / name).write_bytes((keys / name).read_bytes())
    (tmp_path / "security.toml").write_text("\n".join(lines) + "\n")
    server = make_server(security=load_security(tmp_path / "security.toml"))
    console = ConsoleProcess("--server", f"127.0.0.1:{server.server.token_port}",
                             "--ca", str(keys / "ca.crt"))
    try:
        client = signed_in(console.url, "C-1", tokens(keys)["investigator"])

        def links_page() -> tuple[str, str]:  # where it ended up, and what it says
            try:
                reply = client.get("/links?id_number=110101199001010011")
            except urllib.error.HTTPError as error:  # a refusal shown as a page
                return urllib.parse.urlsplit(error.url).path, error.read().decode()
            return urllib.parse.urlsplit(reply.url).path, reply.read().decode()

        assert links_page()[0] == "/links"
        time.sleep(max(0.0, (datetime.fromisoformat(expires) - datetime.now(UTC))
                       .total_seconds()) + 1.0)
        where, text = links_page()
        assert where == "/signin", text
        assert urllib.parse.urlsplit(client.get("/case").url).path == "/signin"
    finally:
        console.stop()
