"""The gallery-wide cluster sweep (Investigate.FindClusters): started with its parameters,
watched live (the page polls the job's state: progress and the clusters found since its last
poll), cancelled, and downloaded as CSV or JSON lines."""

from __future__ import annotations

from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dedup.console import forms
from dedup.console.clusters import ClusterJob
from dedup.console.forms import Form
from dedup.console.sessions import Session
from dedup.console.web import console_of, message, page, render

MAX_MIN_IDS = 1000
MAX_JOBS_KEPT = 5


@page()
async def clusters_page(request: Request, session: Session, form: Form | None) -> Response:
    return render(request, session, "clusters.html",
                  {"jobs": list(session.jobs.values())[::-1], "form": {}})


@page(form="urlencoded")
async def start(request: Request, session: Session, form: Form | None) -> Response:
    assert form is not None and session.case is not None
    try:
        min_ids = forms.whole(form, "min_distinct_id_numbers", "ID numbers per cluster", 2,
                              MAX_MIN_IDS, 2)
        min_score = forms.score(form, "min_score", "minimum score")
    except forms.FieldError as error:
        return render(request, session, "clusters.html",
                      {"jobs": list(session.jobs.values())[::-1], "form": form.fields,
                       "error": str(error)}, 400)
    if any(not job.done for job in session.jobs.values()):
        return message(request, session, "A sweep is running", "Wait for your sweep to end, "
                       "or cancel it, before starting another (the server runs one per "
                       "caller).", 409)
    console = console_of(request)
    job = ClusterJob(session.case, min_ids, min_score)
    job.start(partial(console.backend.find_clusters, session.token, session.case, min_ids,
                      min_score))
    session.jobs[job.id] = job
    for old in list(session.jobs)[:-MAX_JOBS_KEPT]:
        del session.jobs[old]
    return RedirectResponse(f"/clusters/{job.id}", status_code=303)


def _job(request: Request, session: Session) -> ClusterJob | None:
    job: ClusterJob | None = session.jobs.get(request.path_params["job"])
    return job


@page()
async def job_page(request: Request, session: Session, form: Form | None) -> Response:
    job = _job(request, session)
    if job is None:
        return message(request, session, "No such sweep", "This sweep is not one of this "
                       "session's.", 404)
    return render(request, session, "cluster_job.html", {"job": job, **job.state(0)})


@page(touch=False)
async def job_state(request: Request, session: Session, form: Form | None) -> Response:
    job = _job(request, session)
    if job is None:
        return JSONResponse({"error": "no such sweep"}, status_code=404)
    after = request.query_params.get("after", "0")
    return JSONResponse(job.state(int(after) if after.isdigit() else 0))


@page(form="urlencoded")
async def cancel(request: Request, session: Session, form: Form | None) -> Response:
    job = _job(request, session)
    if job is not None:
        job.cancel()
    return RedirectResponse(f"/clusters/{request.path_params['job']}", status_code=303)


@page()
async def download(request: Request, session: Session, form: Form | None) -> Response:
    job = _job(request, session)
    if job is None or request.path_params["kind"] not in ("csv", "jsonl"):
        return message(request, session, "No such sweep", "This sweep is not one of this "
                       "session's.", 404)
    as_csv = request.path_params["kind"] == "csv"
    name = f"clusters-{job.id}.{'csv' if as_csv else 'jsonl'}"
    return Response(job.as_csv() if as_csv else job.as_jsonl(),
                    media_type="text/csv" if as_csv else "application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


ROUTES = [
    Route("/clusters", clusters_page, methods=["GET"]),
    Route("/clusters", start, methods=["POST"]),
    Route("/clusters/{job}", job_page, methods=["GET"]),
    Route("/clusters/{job}/state", job_state, methods=["GET"]),
    Route("/clusters/{job}/cancel", cancel, methods=["POST"]),
    Route("/clusters/{job}/clusters.{kind:str}", download, methods=["GET"]),
]
