"""The console as an ASGI application (Starlette): its pages, its vendored static files, and
the headers every response carries: a strict Content-Security-Policy (scripts, styles and
images from the console itself only, the carrier's photo origin added when configured),
`Cache-Control: no-store` on everything but the static files, no framing, no referrer."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dedup.console import pages_admin, pages_clusters, pages_links, pages_search, pages_session
from dedup.console.backend import Backend
from dedup.console.sessions import SessionStore
from dedup.console.settings import ConsoleSettings, photo_origin
from dedup.console.web import Console, message

HERE = Path(__file__).parent
log = logging.getLogger("dedup.console")


def content_security_policy(settings: ConsoleSettings) -> str:
    images = "'self'"
    if settings.photo_url_template:
        images += " " + photo_origin(settings.photo_url_template)
    return ("default-src 'none'; script-src 'self'; style-src 'self'; "
            f"img-src {images}; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    """Adds the console's headers to every HTTP response."""

    def __init__(self, app: ASGIApp, policy: str, https: bool) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", policy.encode()),
                        (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"),
                        (b"referrer-policy", b"no-referrer"),
                        (b"cross-origin-opener-policy", b"same-origin")]
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() != b"cache-control"]
                headers += self.headers
                headers.append((b"cache-control",
                                b"private, max-age=3600" if static else b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LoopbackHostsOnly:
    """Plain HTTP (which the console serves on loopback only): a request must name a loopback
    host. A page of another site whose name it made resolve to 127.0.0.1 (DNS rebinding)
    names that site, and is refused: it would otherwise read the console as its own origin,
    signing in, as anyone can on a development server, and reading every page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _names_loopback(Headers(scope=scope).get("host")):
            refused = PlainTextResponse("This console answers to loopback names only (such as "
                                        "127.0.0.1 and localhost).", status_code=421)
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _names_loopback(host: str | None) -> bool:
    try:
        name = urlsplit(f"//{host}").hostname if host else None
    except ValueError:
        return False
    if name is None:
        return False
    if name.rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _failed(request: Request, error: Exception) -> Response:
    """Any fault of the console: logged here, a message (no stack trace) on the page."""
    log.error("console: %s on %s %s", type(error).__name__, request.method, request.url.path,
              exc_info=error)
    return message(request, None, "Something went wrong", "The console could not complete "
                   "this request; it has been logged. Nothing more was sent to the server.",
                   500)


async def _not_found(request: Request, error: Exception) -> Response:
    return message(request, None, "Not found", "There is no such page.", 404)


def create_app(settings: ConsoleSettings, backend: Backend | None = None) -> Starlette:
    settings.check()
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.autoescape = True
    routes = [*pages_session.ROUTES, *pages_search.ROUTES, *pages_links.ROUTES,
              *pages_clusters.ROUTES, *pages_admin.ROUTES,
              Mount("/static", StaticFiles(directory=HERE / "static"), name="static")]
    middleware = [Middleware(SecurityHeaders, policy=content_security_policy(settings),
                             https=settings.https)]
    if not settings.https:  # over HTTPS a rebound name fails the certificate's check
        middleware.append(Middleware(LoopbackHostsOnly))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: _not_found, Exception: _failed})
    app.state.console = Console(settings, backend or Backend(settings), templates,
                                SessionStore(settings.idle_timeout_s, settings.session_lifetime_s))
    return app
