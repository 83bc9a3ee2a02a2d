"""Signing in with one's own bearer token, signing out, and opening the case every later call
is made for."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dedup.console.backend import SignInRefused
from dedup.console.forms import Form
from dedup.console.sessions import Case, Session, SettledPairs
from dedup.console.web import call, console_of, log, message, page, render, set_cookie
from dedup.core import validation
from dedup.core.errors import InvalidArgument

CASE_CHARS = 256  # as the server checks case_id and purpose
MAX_TOKEN_CHARS = 4096


@page(need="session")
async def signin_page(request: Request, session: Session, form: Form | None) -> Response:
    ended = request.query_params.get("ended") == "1"
    return render(request, session, "signin.html",
                  {"notice": "Sign in first: there is no session, or it ended (after "
                             "a while without use, or when signed out)." if ended else ""})


@page(need="session", form="urlencoded")
async def signin(request: Request, session: Session, form: Form | None) -> Response:
    assert form is not None
    console = console_of(request)
    token = form.get("token").strip() or None
    if console.settings.authenticated and (token is None or len(token) > MAX_TOKEN_CHARS):
        return render(request, session, "signin.html",
                      {"error": "Give your bearer token."}, 400)
    if not console.settings.authenticated:
        token = None  # a plain channel carries no token: the server is unauthenticated
    try:
        role = await call(console.backend.role_of, token)
    except SignInRefused as refused:
        return render(request, session, "signin.html", {"error": str(refused)}, 401)
    if role not in ("investigator", "admin"):
        log.warning("console: sign-in refused: a token of the %s role", role)
        return message(request, session, "Not for this console", f"This token has the {role} "
                       "role. The console is for investigators and admins: a registration "
                       "desk's token cannot sign in here. Nothing was searched.", 403)
    console.sessions.end(session)
    signed = console.sessions.sign_in(token, role)
    log.info("console: signed in, role %s", role)
    response = RedirectResponse("/case", status_code=303)
    set_cookie(console, response, signed)
    return response


@page(need="session", form="urlencoded")
async def signout(request: Request, session: Session, form: Form | None) -> Response:
    console = console_of(request)
    console.sessions.end(session)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(console.cookie_name, path="/", secure=console.settings.https,
                           httponly=True, samesite="strict")
    return response


@page(need="signin")
async def case_page(request: Request, session: Session, form: Form | None) -> Response:
    return render(request, session, "case.html")


@page(need="signin", form="urlencoded")
async def open_case(request: Request, session: Session, form: Form | None) -> Response:
    assert form is not None
    try:
        case = Case(validation.text(form.get("case_id"), "case ID", CASE_CHARS, True),
                    validation.text(form.get("purpose"), "purpose", CASE_CHARS, True))
    except InvalidArgument as error:
        return render(request, session, "case.html", {"error": str(error),
                                                      "form": form.fields}, 400)
    # The earlier case's sweeps, photo and marks go before the new case is open.
    session.end_sweeps()
    session.probe = None
    session.settled = SettledPairs()  # another case's decisions are not this one's
    session.case = case
    return RedirectResponse("/search", status_code=303)


@page()
async def home(request: Request, session: Session, form: Form | None) -> Response:
    return RedirectResponse("/search", status_code=303)


ROUTES = [
    Route("/", home),
    Route("/signin", signin_page, methods=["GET"]),
    Route("/signin", signin, methods=["POST"]),
    Route("/signout", signout, methods=["POST"]),
    Route("/case", case_page, methods=["GET"]),
    Route("/case", open_case, methods=["POST"]),
]
