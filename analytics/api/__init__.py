"""The REST API of the central service (read-only), under ``/api/v1``.

Endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, which is
where the synchronous store belongs. Every number comes from the store; times are ISO
8601 UTC plus the exact epoch milliseconds used on the wire. ``/openapi.json`` and
``/docs`` describe every route.

One router per resource (``service``, ``devices``, ``zones``, ``readings``,
``completeness``, ``ledger``); the reports, admin, audit and dashboard routes come from
their own packages. :func:`create_app` puts them together; ``analytics.app.build`` is
what calls it with the settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from analytics import admin as admin_routes
from analytics import audit as audit_routes
from analytics.accounting import routes as accounting_routes
from analytics.alerts import routes as alert_routes
from analytics.api import completeness, devices, export, ledger, openaq, readings, service, zones
from analytics.api import errors as api_errors
from analytics.api import sta as sensorthings
from analytics.api.common import DEFAULT_WINDOW_S, StatsProvider
from analytics.apiauth import ApiSecurity, BodyLimit, RejectNul, SecurityHeaders, requires
from analytics.dashboard.routes import Dashboard
from analytics.dashboard.routes import install as install_dashboard
from analytics.metrics_export import CONTENT_TYPE, metrics_registry, render
from analytics.reports import routes as report_routes
from analytics.reports.service import ReportService
from analytics.store.base import Store, StoreError
from civicmesh import __version__
from civicmesh.registry import RegistryFile

__all__ = ["DEFAULT_WINDOW_S", "StatsProvider", "create_app"]

# in the order they appear in /docs
RESOURCES = (service, devices, zones, readings, completeness, ledger, export)


log = logging.getLogger(__name__)


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The database's own text stays in the log: it names tables, hosts and values.
    log.warning("store error on %s: %s", request.url.path, exc)
    return JSONResponse({"detail": "The store is unavailable; try again shortly"}, status_code=503)


def create_app(
    store: Store,
    *,
    registry: RegistryFile | None = None,
    stats_provider: StatsProvider | None = None,
    window_s: int = DEFAULT_WINDOW_S,
    reports: ReportService | None = None,
    dashboard: Dashboard | None = None,
    security: ApiSecurity | None = None,
    max_body_bytes: int = 65_536,
    cors_origins: tuple[str, ...] = (),
    alerts_state_file: Path | None = None,
    alerts_public_url: str = "",
) -> FastAPI:
    """The API application over ``store`` (thread-safe: the endpoints run in a thread pool).

    ``stats_provider`` (e.g. ``IngestWorker.stats``) feeds ``/health``; ``window_s`` is
    the devices' reading window, used for the online flag; ``reports`` serves
    ``/ask``, ``/reports`` and ``/facts``; ``alerts_state_file`` (the alert engine's
    state) feeds ``/alerts``.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, not {window_s}")
    app = FastAPI(
        title="civicmesh",
        version=__version__,
        description="Air-quality and traffic readings of the civicmesh sensor network.",
    )
    app.state.store = store
    app.state.api_security = security
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RejectNul)
    app.add_middleware(SecurityHeaders)  # outermost: errors, 400s and 413s carry them too
    if cors_origins:  # closed unless origins are named
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.state.registry = registry
    app.state.stats_provider = stats_provider
    app.state.window_s = window_s
    app.add_exception_handler(StoreError, _store_unavailable)
    api_errors.install(app)  # a 422 is one line that says what to write
    for resource in RESOURCES:
        app.include_router(resource.router)
    app.state.reports = reports
    app.include_router(report_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(accounting_routes.router)
    app.state.alerts_state_file = alerts_state_file
    app.state.alerts_public_url = alerts_public_url
    app.include_router(alert_routes.router)
    audit_routes.install(app)  # public: the audit log needs no token
    openaq.install(app)  # /openaq/v3, with the x-ratelimit-* headers OpenAQ clients read
    sensorthings.install(app)  # /sta/v1.1, OGC SensorThings API 1.1 (read)
    if dashboard is not None:
        install_dashboard(app, dashboard)
    if stats_provider is not None:
        registry_ = metrics_registry(stats_provider)

        @app.get("/metrics", include_in_schema=False, dependencies=[requires("operator")])
        def metrics() -> Response:
            """Prometheus text format: the in-process ingest worker's counters."""
            return Response(render(registry_), media_type=CONTENT_TYPE)

    return app
