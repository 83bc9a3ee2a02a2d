"""Search by an uploaded photo or a registration_id (Investigate.Search) with its filters,
the probe photo shown back with the face the server used, and one registration's page
(FaceDedup.GetRegistration)."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dedup._proto.dedup.v1 import dedup_pb2 as pb
from dedup.console import forms
from dedup.console.forms import Form
from dedup.console.sessions import Session, SettledPairs
from dedup.console.views import detected_view, match_rows, quality_view, registration_view
from dedup.console.web import call, console_of, message, page, render

MAX_K = 1000  # as the server allows
IMAGE_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


def _image_type(data: bytes) -> str:
    return next((kind for magic, kind in IMAGE_TYPES.items() if data.startswith(magic)), "")


def search_request(form: Form) -> pb.SearchRequest:
    """The request the form asks for (without its probe); FieldError naming a field."""
    request = pb.SearchRequest(k=forms.whole(form, "k", "k (results)", 1, MAX_K, 10),
                               carrier=form.get("carrier").strip(),
                               region=form.get("region").strip())
    min_score = forms.score(form, "min_score", "minimum score")
    if min_score is not None:
        request.min_score = min_score
    for name, label, field in (("enrolled_from", "enrolled from", request.enrolled_from),
                               ("enrolled_until", "enrolled until", request.enrolled_until)):
        moment = forms.moment(form, name, label)
        if moment is not None:
            stamp = Timestamp()
            stamp.FromDatetime(moment)
            field.CopyFrom(stamp)
    return request


@page()
async def search_page(request: Request, session: Session, form: Form | None) -> Response:
    return render(request, session, "search.html", {"form": {"k": "10"}})


@page(form="multipart")
async def search(request: Request, session: Session, form: Form | None) -> Response:
    assert form is not None and session.case is not None
    console = console_of(request)
    context: dict[str, Any] = {"form": form.fields}
    try:
        query = search_request(form)
    except forms.FieldError as error:
        return render(request, session, "search.html", {**context, "error": str(error)}, 400)
    registration_id = form.get("registration_id").strip()
    if form.photo:
        query.face.CopyFrom(pb.Face(image=form.photo,
                                    use_largest_face=form.get("largest") == "on"))
        checked = form.get("application_id").strip()
    elif registration_id:
        query.registration_id = registration_id
        checked = registration_id
    else:
        return render(request, session, "search.html",
                      {**context, "error": "Give a photo or a registration ID."}, 400)
    case, settled = session.case, session.settled  # another case may open meanwhile
    reply = await call(console.backend.search, session.token, case, query)
    context.update(_results(reply, checked, console, settled, bool(form.photo)))
    if form.photo and session.case is case:
        session.probe, session.probe_type = form.photo, _image_type(form.photo)
    elif form.photo:  # not kept for another case: no picture of it on this page
        context.pop("detected", None)
    context["probe"] = "photo" if form.photo else registration_id
    context["case"] = case  # the case it was searched under, whatever opened meanwhile
    return render(request, session, "search.html", context)


def _results(reply: pb.SearchResponse, checked: str, console: Any, settled: SettledPairs,
             by_photo: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "rows": match_rows(reply.matches, checked, console.settings, settled),
        "checked": checked, "audit_record_hash": reply.audit_record_hash,
        "searched": True}
    if by_photo and reply.HasField("quality"):
        results["quality"] = quality_view(reply.quality)
    if by_photo and reply.HasField("detected_face"):
        results["detected"] = detected_view(reply.detected_face)
    return results


@page()
async def probe_photo(request: Request, session: Session, form: Form | None) -> Response:
    """The photo of this session's last search by photo (only a JPEG or PNG)."""
    if session.probe is None or not session.probe_type:
        return Response(status_code=404)
    return Response(session.probe, media_type=session.probe_type)


@page()
async def registration(request: Request, session: Session, form: Form | None) -> Response:
    assert session.case is not None
    console = console_of(request)
    registration_id = request.path_params["registration_id"]
    if not registration_id.strip() or len(registration_id) > 256:
        return message(request, session, "No such registration", "Not a registration ID.", 400)
    found = await call(console.backend.registration, session.token, session.case,
                       registration_id)
    return render(request, session, "registration.html",
                  {"registration": registration_view(found, console.settings)})


ROUTES = [
    Route("/search", search_page, methods=["GET"]),
    Route("/search", search, methods=["POST"]),
    Route("/search/probe", probe_photo, methods=["GET"]),
    Route("/registrations/{registration_id:path}", registration, methods=["GET"]),
]
