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


def test_https_sets_a_secure_host_only_cookie_and_strict_headers(keys):
    console = ConsoleProcess("--server", "127.0.0.1:9", "--ca", str(keys / "ca.crt"),
                             "--certificate", str(keys / "server.crt"),
                             "--private-key", str(keys / "server.key"))
    try:
        assert console.url.startswith("https://")
        client = Client(console.url, ssl.create_default_context(cafile=str(keys / "ca.crt")))
        reply = client.get("/signin")
        cookie = reply.headers["Set-Cookie"]
        assert cookie.startswith("__Host-dedup-console=")
        for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
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
        assert cookie.startswith("dedup-console=") and "Secure" not in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "<script>" not in page.read().decode()  # no inline script
        static = client.get("/static/console.js")
        assert static.headers["Cache-Control"].startswith("private, max-age=")
        # A page that needs a session sends the person to sign in, never shows data.
        assert client.get("/links?id_number=X").url.endswith("/signin")
        no_session = Client(console.url).post("/case", {"case_id": "C", "purpose": "P"})
        assert no_session.url.endswith("/signin?ended=1")
    finally:
        console.stop()


def test_an_idle_session_ends_and_polling_does_not_keep_it_alive():
    store = SessionStore(idle_timeout_s=0.3, lifetime_s=60)
    session = store.new()
    session.token = "the-bearer-token"
    time.sleep(0.2)
    assert store.get(session.id) is session  # the person's request: the clock starts again
    time.sleep(0.2)
    assert store.get(session.id, touch=False) is session  # a page's poll
    time.sleep(0.2)
    assert store.get(session.id) is None
    assert session.token is None  # forgotten with the session


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
