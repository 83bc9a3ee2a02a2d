"""What every page shares: the console's state, the session behind a request, the CSRF check
on every form, rendering a template with the case and role, and turning a server's refusal
into a message on the page (never a stack trace)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from dedup.console.backend import Backend, ServerRefused
from dedup.console.forms import Form, UploadRefused, read_multipart
from dedup.console.sessions import (
    COOKIE,
    SECURE_COOKIE,
    SECURE_SIGN_IN_COOKIE,
    SIGN_IN_COOKIE,
    Session,
    SessionStore,
)
from dedup.console.settings import ConsoleSettings

log = logging.getLogger("dedup.console")
FORM_LIMITS = {"max_files": 0, "max_fields": 50, "max_part_size": 8192}

# A page handler: the request, its live session, the form it posted (None for GET).
Handler = Callable[[Request, Session, Form | None], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class Console:
    settings: ConsoleSettings
    backend: Backend
    templates: Jinja2Templates
    sessions: SessionStore

    # The sign-in page's CSRF tokens are MACs of their cookie's nonce under this key.
    sign_in_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE if self.settings.https else COOKIE

    @property
    def sign_in_cookie_name(self) -> str:
        return SECURE_SIGN_IN_COOKIE if self.settings.https else SIGN_IN_COOKIE


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def set_cookie(console: Console, response: Response, session: Session) -> None:
    response.set_cookie(console.cookie_name, session.id, httponly=True, samesite="strict",
                        secure=console.settings.https, path="/")


def render(request: Request, session: Session | None, template: str,
           context: dict[str, Any] | None = None, status_code: int = 200) -> Response:
    console = console_of(request)
    values = {"session": session, "csrf": session.form_token() if session else "",
              "case": session.case if session else None,
              "role": session.role if session else None,
              "photos": bool(console.settings.photo_url_template),
              "unauthenticated": not console.settings.authenticated, **(context or {})}
    return console.templates.TemplateResponse(request, template, values,
                                              status_code=status_code)


def message(request: Request, session: Session | None, title: str, text: str,
            status_code: int) -> Response:
    return render(request, session, "message.html", {"title": title, "text": text},
                  status_code)


async def call(function: Callable[..., Any], *args: Any) -> Any:
    """A blocking gRPC call, off the event loop."""
    return await run_in_threadpool(function, *args)


def refused_text(refused: ServerRefused) -> str:
    if refused.code == "UNAVAILABLE":
        return f"the server cannot be reached (UNAVAILABLE: {refused.message})"
    return f"the server refused: {refused.code}: {refused.message}"


def page(need: str = "case", form: str = "", touch: bool = True) -> Callable[[Handler], Endpoint]:
    """A page: `need` "session" (sign-in), "signin", "case" or "admin"; `form` "urlencoded"
    or "multipart" for a POST (its CSRF token is checked before the handler runs); `touch`
    False for the page's own polling (not the person's activity)."""
    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            console = console_of(request)
            session = console.sessions.get(request.cookies.get(console.cookie_name, ""), touch)
            nonce = ""
            if session is None and need == "session" and request.url.path == "/signin":
                session, nonce = _before_sign_in(request, console)
            if session is None:
                return _no_session(request)
            refusal = _missing(request, session, need)
            if refusal is not None:
                return refusal
            posted: Form | None = None
            if request.method == "POST":
                try:
                    posted = await _read_form(request, console, form)
                except UploadRefused as refused:
                    return message(request, session, refused.title, refused.text,
                                   refused.status_code)
                if not session.csrf_matches(posted.get("csrf"),
                                            case_bound=need in ("case", "admin")):
                    return message(request, session, "Form refused", "This form did not "
                                   "come from this console's own page, or the page is from "
                                   "an earlier session or was shown under another case than "
                                   "the one open now: nothing was done. Open the page again "
                                   "and resubmit.", 403)
            try:
                response = await handler(request, session, posted)
                if nonce:
                    set_sign_in_cookie(console, response, nonce)
                return response
            except ServerRefused as refused:
                if refused.code == "UNAUTHENTICATED" and session.signed_in \
                        and need != "session":  # (signing in again: its own page says why)
                    return signed_out(console, session)  # the token expired or was revoked
                if not session.signed_in:  # no internals (addresses, TLS) before sign-in
                    log.warning("console: sign-in could not ask the server: %s",
                                refused_text(refused))
                    return message(request, session, "The server cannot answer", "Signing "
                                   "in asks the server, which cannot be reached or did not "
                                   "answer the console; try again later. The console's log "
                                   "has the details.", 502)
                return message(request, session, "The server refused", refused_text(refused),
                               502 if refused.code == "UNAVAILABLE" else 400)
        return endpoint
    return wrap


def _before_sign_in(request: Request, console: Console) -> tuple[Session, str]:
    """The sign-in page's own session: kept nowhere (a flood of sign-in pages costs the
    console no memory, and can end no one's session), its CSRF token a MAC of a random
    nonce in a cookie of its own, which another site can neither read nor set. Returns it
    and the nonce to set as that cookie ("" if the browser has it already)."""
    sent = request.cookies.get(console.sign_in_cookie_name, "")
    nonce = sent if 16 <= len(sent) <= 64 else secrets.token_urlsafe(24)
    csrf = hmac.new(console.sign_in_key, nonce.encode(), hashlib.sha256).hexdigest()
    now = time.monotonic()
    return Session("", csrf, now, now), "" if nonce == sent else nonce


def set_sign_in_cookie(console: Console, response: Response, nonce: str) -> None:
    # Lax, not Strict: a link from another site to the sign-in page then sends it and keeps
    # the nonce (a form already open in another tab stays good); a cross-site POST still
    # goes without it, so its token never matches.
    response.set_cookie(console.sign_in_cookie_name, nonce, httponly=True, samesite="lax",
                        secure=console.settings.https, path="/")


def signed_out(console: Console, session: Session) -> Response:
    """Ends `session` (its token is no longer one the console signs in with): the sign-in
    page next."""
    console.sessions.end(session)
    return RedirectResponse("/signin?ended=1", status_code=303)


def _no_session(request: Request) -> Response:
    if request.url.path.endswith((".json", "/state")):
        return message(request, None, "Signed out", "Your session has ended.", 401)
    return RedirectResponse("/signin?ended=1", status_code=303)


def _missing(request: Request, session: Session, need: str) -> Response | None:
    """Why this session may not see this page (a redirect or a refusal), or None."""
    if need == "session":
        return None
    if not session.signed_in:
        return RedirectResponse("/signin", status_code=303)
    if need == "admin" and session.role != "admin":
        return message(request, session, "Admins only", "This page is for the admin role.",
                       403)
    if need in ("case", "admin") and session.case is None:
        return RedirectResponse("/case", status_code=303)
    return None


async def _read_form(request: Request, console: Console, kind: str) -> Form:
    if kind == "multipart":
        return await read_multipart(request, console.settings.max_upload_bytes)
    data: FormData = await request.form(**FORM_LIMITS)
    return Form({name: value for name, value in data.items() if isinstance(value, str)})
