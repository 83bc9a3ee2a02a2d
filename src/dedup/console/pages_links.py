"""Links of an ID number (Investigate.Links): the ID numbers sharing a face with it, as an
interactive graph (the vendored cytoscape.js draws it from a JSON data block in the page)
and as a table; and settling a match (Investigate.Adjudicate), confirmed before it is sent."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.console import forms
from dedup.console.forms import Form
from dedup.console.sessions import Session
from dedup.console.views import links_view
from dedup.console.web import call, console_of, log, page, render

DECISIONS = {"same": ("same person", pb.SAME_PERSON_CONFIRMED),
             "different": ("different people", pb.DIFFERENT_PEOPLE)}
MAX_NOTE_CHARS = 1000


@page()
async def links(request: Request, session: Session, form: Form | None) -> Response:
    assert session.case is not None
    id_number = request.query_params.get("id_number", "").strip()
    if not id_number:
        return render(request, session, "links.html", {})
    console = console_of(request)
    reply = await call(console.backend.links, session.token, session.case, id_number)
    return render(request, session, "links.html",
                  {"id_number": id_number,
                   **links_view(reply, id_number, console.settings, session.settled)})


def _return_to(form: Form) -> str:
    """Where to go back after settling: a path of this console only."""
    path = form.get("return_to")
    # Not "//host" nor "/\host", which browsers take for another site.
    local = (path.startswith("/") and not path.startswith("//") and "\\" not in path
             and path.isprintable())
    return path if local else "/search"


@page(form="urlencoded")
async def adjudicate(request: Request, session: Session, form: Form | None) -> Response:
    """First post: the confirmation page (nothing sent); second, with `confirmed`: the call."""
    assert form is not None and session.case is not None
    pair = {name: form.get(name).strip() for name in
            ("registration_id", "matched_registration_id", "score", "decision", "note")}
    context = {"pair": pair, "return_to": _return_to(form)}
    problem = _problem(pair)
    if problem:
        return render(request, session, "adjudicate.html", {**context, "error": problem}, 400)
    label, decision = DECISIONS[pair["decision"]]
    context["decision_label"] = label
    if form.get("confirmed") != "yes":
        return render(request, session, "adjudicate.html", context)
    adjudication = pb.AdjudicateRequest(registration_id=pair["registration_id"],
                                        matched_registration_id=pair["matched_registration_id"],
                                        decision=decision, note=pair["note"])
    if pair["score"]:
        adjudication.score = float(pair["score"])
    console = console_of(request)
    case, settled = session.case, session.settled  # another case may open meanwhile
    reply = await call(console.backend.adjudicate, session.token, case, adjudication)
    settled.add(pair["registration_id"], pair["matched_registration_id"], label)
    log.info("console: a pair settled as %s", label)
    return render(request, session, "adjudicated.html",
                  {**context, "case": case, "score": f"{reply.score:.4f}",
                   "audit_record_hash": reply.audit_record_hash})


def _problem(pair: dict[str, str]) -> str:
    if not pair["registration_id"]:
        return ("Give the registration ID of the checked application (for a search by "
                "photo: the application the photo came with).")
    if not pair["matched_registration_id"]:
        return "Give the matched registration ID."
    if pair["decision"] not in DECISIONS:
        return "Choose same person or different people."
    if len(pair["note"]) > MAX_NOTE_CHARS:
        return f"The note is {len(pair['note'])} characters, at most {MAX_NOTE_CHARS}."
    try:
        forms.score(Form(pair), "score", "score")
    except forms.FieldError as error:
        return str(error)
    return ""


ROUTES = [
    Route("/links", links, methods=["GET"]),
    Route("/adjudicate", adjudicate, methods=["POST"]),
]
