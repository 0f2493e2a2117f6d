"""The web worklist: studies, a study's results and history, jobs with retry.

Routes (mounted by :func:`dicomnode.web.app.create_app` through ``extra_routes``):

``/``                                   worklist: studies by priority, then newest first
``/studies/{uid}``                      study: series, findings (from the SR), key slices,
                                        heat maps, key images, corrections sent back,
                                        jobs and every delivery attempt (view audited)
``/jobs/{id}/slices/{series}/{n}.png``  a key slice of a SEG over its CT
``/jobs/{id}/heatmap/{series}.png``     the heat map's hottest slice over its CT
``/jobs``                               jobs, the dead-lettered ones first, with retry
``/jobs/{id}/retry`` (POST)             :meth:`Outbox.retry_job`
``/static/...``                         CSS and JavaScript (no CDN: served by the node)

Pages refresh themselves (``static/refresh.js`` swaps the ``main`` element every few
seconds).  Endpoints are plain functions, so Starlette runs their file and database reads
in its thread pool, off the event loop.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicomnode.errors import DicomNodeError
from dicomnode.jobs.store import Job
from dicomnode.outputs.layout import job_folder, result_files, results_root
from dicomnode.spool.feedback import FeedbackInbox
from dicomnode.web.app import TOKEN_COOKIE, WebContext
from dicomnode.web.history import Attempt, delivery_attempts
from dicomnode.web.render import (
    HeatMapFrame,
    Segmentation,
    key_slices,
    read_heat_map,
    read_key_images,
    read_segmentation,
    render_heat_map,
    render_key_slice,
)
from dicomnode.web.reports import ReportSummary, read_report
from dicomnode.web.views import (
    StudyRow,
    current_jobs,
    delivery_states,
    display_state,
    findings_text,
    priority_of,
    read_header,
    series_rows,
    study_priority,
    triage_of,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_STUDIES = 300
REFRESH_S = 5


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@lru_cache(maxsize=32)
def _segmentation(path: Path, mtime_ns: int) -> Segmentation:
    return read_segmentation(path)


def cached_segmentation(path: Path) -> Segmentation:
    """A SEG read once per version of its file."""
    return _segmentation(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _heat_map(path: Path, mtime_ns: int) -> HeatMapFrame:
    return read_heat_map(path)


def cached_heat_map(path: Path) -> HeatMapFrame:
    """A heat map's hottest frame, read once per version of its file."""
    return _heat_map(path, path.stat().st_mtime_ns)


@dataclass
class SeriesResult:
    """What a job produced for one series."""

    series_instance_uid: str
    report: ReportSummary | None
    slices: int
    segmentation_error: str = ""
    #: A heat map (Parametric Map) was made: the page shows its hottest slice.
    heat_map: bool = False
    #: The key images of the findings (the KOS's description, one line per finding).
    key_images: list[str] = field(default_factory=list)


@dataclass
class JobView:
    job: Job
    priority: str
    findings: list[str]
    results: list[SeriesResult]
    items: list[Any]
    attempts: list[Attempt]


class Pages:
    """The page endpoints over one :class:`WebContext`."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["when"] = _when
        env.filters["quote"] = lambda s: quote(str(s), safe="")
        self.templates = Jinja2Templates(env=env)
        self.results = results_root(ctx.config.node.data_dir)

    def render(self, request: Request, name: str, **context: Any) -> Response:
        context.setdefault("message", request.query_params.get("message", ""))
        context["refresh_s"] = REFRESH_S
        context["node"] = self.ctx.config.node.ae_title
        return self.templates.TemplateResponse(request, name, context)

    # --- worklist ----------------------------------------------------------------------

    def study_row(self, uid: str) -> StudyRow | None:
        study = self.ctx.index.study(uid)
        if study is None:
            return None
        jobs = self.ctx.jobs.for_study(uid)
        current = current_jobs(study, jobs)
        state, why = display_state(study, jobs)
        instances = self.ctx.index.latest_instances(uid)
        items = [i for j in current for i in self.ctx.outbox.items(j.id)]
        return StudyRow(
            study,
            read_header(instances[0].path) if instances else read_header(Path("")),
            state,
            why,
            study_priority(current),
            triage_of(current),
            series_rows(instances),
            [line for j in current for line in findings_text(j)],
            delivery_states(current, items),
        )

    def worklist(self, request: Request) -> Response:
        studies = self.ctx.index.studies()[-MAX_STUDIES:]
        rows = [r for s in studies if (r := self.study_row(s.study_instance_uid))]
        rows.sort(key=lambda r: r.sort_key)
        return self.render(request, "worklist.html", rows=rows, title="Worklist")

    # --- study -------------------------------------------------------------------------

    def series_result(self, job: Job, series_uid: str) -> SeriesResult:
        files = result_files(job_folder(self.results, job.id), series_uid, job.route)
        report = read_report(files.report) if files.report.is_file() else None
        result = SeriesResult(series_uid, report, 0)
        if files.segmentation.is_file():
            try:
                result.slices = len(key_slices(cached_segmentation(files.segmentation)))
            except (OSError, ValueError, AttributeError, KeyError) as exc:
                result.segmentation_error = f"cannot read the SEG: {exc}"
        result.heat_map = files.heat_map.is_file()
        if files.key_images.is_file():
            try:
                result.key_images = read_key_images(files.key_images)
            except (OSError, ValueError, AttributeError) as exc:
                result.key_images = [f"cannot read the key images: {exc}"]
        return result

    def job_view(self, job: Job) -> JobView:
        until = None if job.finished_at is None else _iso(job.finished_at + 1)
        return JobView(
            job,
            priority_of(job),
            findings_text(job),
            [self.series_result(job, s) for s in job.series_uids],
            self.ctx.outbox.items(job.id),
            delivery_attempts(
                self.ctx.config.node.audit_path,
                job.id,
                set(job.destinations),
                _iso(job.created_at),
                until,
            ),
        )

    def study(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        row = self.study_row(uid)
        if row is None:
            return PlainTextResponse("no such study", 404)
        if "x-refresh" not in request.headers:  # a person opened it, not the timer
            self.ctx.audit.record(
                "page_view",
                page="study",
                study_instance_uid=uid,
                client=request.client.host if request.client else "",
            )
        jobs = [self.job_view(j) for j in reversed(self.ctx.jobs.for_study(uid))]
        corrections = FeedbackInbox(self.ctx.index.db).for_study(uid)
        return self.render(
            request, "study.html", row=row, jobs=jobs, corrections=corrections, title="Study"
        )

    def key_slice(self, request: Request) -> Response:
        job = self._job(request)
        if job is None:
            return PlainTextResponse("no such job", 404)
        series_uid = request.path_params["series"]
        number = int(request.path_params["n"])
        files = result_files(job_folder(self.results, job.id), series_uid, job.route)
        if series_uid not in job.series_uids or not files.segmentation.is_file():
            return PlainTextResponse("no segmentation", 404)
        seg = cached_segmentation(files.segmentation)
        slices = key_slices(seg)
        if not 0 <= number < len(slices):
            return PlainTextResponse("no such slice", 404)
        key = slices[number]
        paths = {
            i.sop_instance_uid: i.path
            for i in self.ctx.index.latest_instances(job.study_instance_uid)
        }
        if key.sop_instance_uid not in paths:
            return PlainTextResponse("the source image is no longer in the spool", 404)
        window = None
        try:
            if "wc" in request.query_params and "ww" in request.query_params:
                window = (float(request.query_params["wc"]), float(request.query_params["ww"]))
        except ValueError:
            return PlainTextResponse("wc and ww must be numbers", 400)
        png = render_key_slice(paths[key.sop_instance_uid], key, seg, window)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    def heat_map(self, request: Request) -> Response:
        job = self._job(request)
        if job is None:
            return PlainTextResponse("no such job", 404)
        series_uid = request.path_params["series"]
        files = result_files(job_folder(self.results, job.id), series_uid, job.route)
        if series_uid not in job.series_uids or not files.heat_map.is_file():
            return PlainTextResponse("no heat map", 404)
        heat = cached_heat_map(files.heat_map)
        paths = {
            i.sop_instance_uid: i.path
            for i in self.ctx.index.latest_instances(job.study_instance_uid)
        }
        if heat.sop_instance_uid not in paths:
            return PlainTextResponse("the source image is no longer in the spool", 404)
        png = render_heat_map(paths[heat.sop_instance_uid], heat)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    # --- jobs --------------------------------------------------------------------------

    def _job(self, request: Request) -> Job | None:
        try:
            return self.ctx.jobs.get(int(request.path_params["job_id"]))
        except (KeyError, ValueError):
            return None

    def jobs(self, request: Request) -> Response:
        jobs = self.ctx.jobs.list_jobs(limit=MAX_STUDIES)
        views = []
        for job in jobs:
            items = self.ctx.outbox.items(job.id)
            dead = [i for i in items if str(i.state) == "dead"]
            views.append((job, priority_of(job), findings_text(job), items, dead))
        dead_letter = [v for v in views if v[4]]
        return self.render(request, "jobs.html", jobs=views, dead_letter=dead_letter, title="Jobs")

    async def retry(self, request: Request) -> Response:
        if not _same_origin(request):
            return PlainTextResponse("cross-site request refused", 403)
        # a urlencoded form of one field: parsed here, without python-multipart
        form = parse_qs((await request.body()).decode(errors="replace"))
        back = form.get("next", ["/jobs"])[0]
        if not back.startswith("/") or back.startswith("//"):
            back = "/jobs"
        job = self._job(request)
        if job is None:
            message = "no such job"
        else:
            try:
                state = self.ctx.outbox.retry_job(job.id)
                message = f"job {job.id}: {state}"
                self.ctx.audit.record("operator", action="retry", job_id=job.id, state=str(state))
            except (DicomNodeError, ValueError, KeyError) as exc:
                message = f"job {job.id} not retried: {exc}"
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}message={quote(message)}", 303)


LOGIN_FORM = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in</title>
<link rel="stylesheet" href="/static/dashboard.css"></head><body><main>
<h1>Sign in</h1><p>{message}</p><form method="post" action="/login">
<input type="password" name="token" autocomplete="current-password" placeholder="token">
<button type="submit" class="retry">Sign in</button></form></main></body></html>"""


def login_routes(ctx: WebContext) -> list[BaseRoute]:
    """``/login``: a browser trades ``[http].token`` for an HttpOnly cookie."""

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(LOGIN_FORM.format(message="This node requires its token."))
        if not _same_origin(request):
            return PlainTextResponse("cross-site request refused", 403)
        form = parse_qs((await request.body()).decode(errors="replace"))
        given = form.get("token", [""])[0]
        if not ctx.config.http.token or not hmac.compare_digest(
            given.encode(), ctx.config.http.token.encode()
        ):
            return HTMLResponse(LOGIN_FORM.format(message="Wrong token."), 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(
            TOKEN_COOKIE,
            given,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    return [Route("/login", login, methods=["GET", "POST"])]


def _same_origin(request: Request) -> bool:
    """A POST from another site's page (a form aimed at 127.0.0.1) is refused."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def page_routes(ctx: WebContext) -> list[BaseRoute]:
    """The worklist's routes, for ``create_app(ctx, extra_routes=...)``."""
    pages = Pages(ctx)
    return [
        *login_routes(ctx),
        Route("/", pages.worklist),
        Route("/studies/{uid}", pages.study),
        Route("/jobs", pages.jobs),
        Route("/jobs/{job_id:int}/retry", pages.retry, methods=["POST"]),
        Route("/jobs/{job_id:int}/slices/{series}/{n:int}.png", pages.key_slice),
        Route("/jobs/{job_id:int}/heatmap/{series}.png", pages.heat_map),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
