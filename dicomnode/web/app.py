"""The node's ASGI application: health, readiness and metrics; DICOMweb and pages mount here.

Access: on 127.0.0.1 (the default) every request is served; bound to another address the
node requires ``Authorization: Bearer <[http].token>`` on everything but ``/healthz``,
``/readyz`` (which show no patient data) and ``/login``, because the other pages do.  A
browser signs in once at ``/login``: the token then travels in an HttpOnly, SameSite=Strict
cookie (:data:`TOKEN_COOKIE`).
"""

from __future__ import annotations

import hmac
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from dicomnode.audit import AuditLog
from dicomnode.config import Config
from dicomnode.delivery.store import Outbox
from dicomnode.jobs.store import JobState, JobStore
from dicomnode.spool.index import Index
from dicomnode.spool.query import Catalog
from dicomnode.spool.store import Spool

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login"})
TOKEN_COOKIE = "dicomnode_token"


@dataclass
class WebContext:
    """What the HTTP layer reads, through the owners of the tables."""

    config: Config
    index: Index
    jobs: JobStore
    outbox: Outbox
    audit: AuditLog
    #: Why the node is not ready ([] when it is).
    readiness: Callable[[], list[str]]
    #: Process-local metrics (counters of the SCP, ...) to expose beside the database ones.
    registry: CollectorRegistry
    #: What QIDO-RS and WADO-RS search (the C-FIND catalog); None: DICOMweb answers 503.
    catalog: Catalog | None = None
    #: Where STOW-RS stores, by the receive rules; None: STOW-RS answers 503.
    spool: Spool | None = None


class _StoreCollector(Collector):
    """Gauges read from the database and the disk at scrape time (true across processes)."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs by state", labels=["state"])
        counts = self.ctx.jobs.counts()
        for job_state in JobState:
            jobs.add_metric([str(job_state)], counts.get(str(job_state), 0))
        yield jobs
        outbox = GaugeMetricFamily(
            "dicomnode_outbox_items", "Result files in the outbox by state", labels=["state"]
        )
        for state, count in sorted(self.ctx.outbox.counts().items()):
            outbox.add_metric([state], count)
        yield outbox
        studies = GaugeMetricFamily("dicomnode_studies", "Studies by state", labels=["state"])
        for state, count in sorted(self.ctx.index.study_counts().items()):
            studies.add_metric([state], count)
        yield studies
        yield GaugeMetricFamily(
            "dicomnode_disk_free_bytes",
            "Free bytes in the data directory",
            value=shutil.disk_usage(self.ctx.config.node.data_dir).free,
        )


class _TokenMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: object, token: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.expected = f"Bearer {token}".encode()
        self.token = token.encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "").encode()
            cookie = request.cookies.get(TOKEN_COOKIE, "").encode()
            if not (
                hmac.compare_digest(given, self.expected) or hmac.compare_digest(cookie, self.token)
            ):
                if "text/html" in request.headers.get("accept", ""):
                    return RedirectResponse("/login", 303)
                return PlainTextResponse(
                    "a bearer token is required", 401, {"WWW-Authenticate": "Bearer"}
                )
        return await call_next(request)


def create_app(ctx: WebContext, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    """The node's app; ``extra_routes`` come from the DICOMweb and page modules."""
    registry = ctx.registry
    registry.register(_StoreCollector(ctx))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        reasons = ctx.readiness()
        return JSONResponse({"ready": not reasons, "reasons": reasons}, 200 if not reasons else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    middleware = []
    if ctx.config.http.token:
        middleware.append(Middleware(_TokenMiddleware, token=ctx.config.http.token))
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes, middleware=middleware)
