"""The admin pages: the server's Stats and IndexAdmin.GetIndexInfo as a dashboard, and the
audit trail: whether it verifies, and its records filtered by case, caller and time."""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dedup.console import audit, forms
from dedup.console.backend import SignInRefused
from dedup.console.forms import Form
from dedup.console.sessions import Session
from dedup.console.settings import AuditSource
from dedup.console.views import index_view, now_text, stats_view
from dedup.console.web import call, console_of, log, message, page, render, signed_out


@page(need="admin")
async def dashboard(request: Request, session: Session, form: Form | None) -> Response:
    console = console_of(request)
    stats, info = await asyncio.gather(
        call(console.backend.stats, session.token, session.case),
        call(console.backend.index_info, session.token, session.case))
    return render(request, session, "admin.html",
                  {"stats": stats_view(stats), "index": index_view(info), "now": now_text()})


def _filter(request: Request) -> audit.RecordFilter:
    query = Form(dict(request.query_params))
    return audit.RecordFilter(
        case_id=query.get("case_id").strip(), caller=query.get("caller").strip(),
        since=forms.moment(query, "since", "since"), until=forms.moment(query, "until", "until"),
        limit=forms.whole(query, "limit", "at most", 1, 5000, 200))


@page(need="admin")
async def audit_page(request: Request, session: Session, form: Form | None) -> Response:
    console = console_of(request)
    # The trail is read from the data directory, not through the server: the admin's token
    # is asked about first on every read, so one expired or revoked since sign-in reads
    # nothing more.
    try:
        role = await call(console.backend.role_of, session.token)
    except SignInRefused:
        return signed_out(console, session)
    if role == "investigator":
        session.role = role  # the admin pages go from its menu too
        return message(request, session, "Admins only", "This token no longer has the admin "
                       "role.", 403)
    if role != "admin":  # no longer a role the console signs in
        return signed_out(console, session)
    assert session.case is not None
    log.info("console: the audit trail read by an admin for case %r", session.case.case_id)
    source = console.settings.audit
    context: dict[str, object] = {"configured": source.configured,
                                  "query": dict(request.query_params)}
    if not source.configured:
        return render(request, session, "audit.html", context)
    try:
        wanted = _filter(request)
    except forms.FieldError as error:
        return render(request, session, "audit.html", {**context, "error": str(error)}, 400)
    verification, (records, failure) = await asyncio.gather(
        run_in_threadpool(audit.verify, source), run_in_threadpool(_records, source, wanted))
    context.update(verification=verification, records=records, limit=wanted.limit,
                   now=now_text(), keyed=source.key is not None, error=failure)
    return render(request, session, "audit.html", context)


def _records(source: AuditSource, wanted: audit.RecordFilter
             ) -> tuple[list[dict[str, object]], str]:
    try:
        return audit.records(source, wanted), ""
    except ValueError as error:
        return [], f"dedup audit export failed: {error}"


ROUTES = [
    Route("/admin", dashboard, methods=["GET"]),
    Route("/admin/audit", audit_page, methods=["GET"]),
]
