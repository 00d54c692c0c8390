"""The dashboard: one page application served by the analytics service itself.

Every script, style and map shape comes from this app (no CDN, no tile server, no web
font), so it works on a city network without internet access. Pages read
``/dashboard/api/...``, which needs a signed-in session; roles are viewer (read, ask),
operator (also write reports now) and admin (also register devices and edit zones).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from analytics.admin import RegisterDeviceIn as DeviceIn
from analytics.admin import add_device
from analytics.alerts import routes as alert_routes
from analytics.dashboard import views
from analytics.dashboard.auth import (
    COOKIE,
    ROLES,
    Session,
    SessionSigner,
    UserFile,
    role_allows,
)
from analytics.reports.facts import iso
from analytics.reports.intent import IntentError
from analytics.reports.service import ReportService, record_dict, to_record
from analytics.store.base import Store, ZoneShape
from civicmesh.registry import Registry, RegistryFile
from civicmesh.timeutil import now_ms

STATIC = resources.files("analytics.dashboard").joinpath("static")
LOGIN_ATTEMPTS_PER_MINUTE = 10
MAX_GEOMETRY_BYTES = 200_000


class Dashboard:
    """Everything the routes need, in one object on ``app.state.dashboard``."""

    def __init__(
        self,
        store: Store,
        reports: ReportService,
        users: UserFile,
        signer: SessionSigner,
        *,
        registry_path: Path | None = None,
        window_s: int = 60,
        live_interval_s: float = 1.0,
        secure_cookies: bool = False,
    ) -> None:
        self.store = store
        self.reports = reports
        self.users = users
        self.signer = signer
        self.registry_path = registry_path
        self.window_s = window_s
        self.live_interval_s = live_interval_s
        self.secure_cookies = secure_cookies
        self._attempts: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def allow_login_attempt(self, client: str) -> bool:
        """False once ``client`` failed to sign in ``LOGIN_ATTEMPTS_PER_MINUTE`` times in
        the last minute. Only failures count: a city office behind one address, its staff
        signing in at nine, is never locked out by its own successful sign-ins."""
        cutoff = time.monotonic() - 60
        with self._lock:
            recent = [t for t in self._attempts.get(client, []) if t > cutoff]
            if recent:
                self._attempts[client] = recent
            else:
                self._attempts.pop(client, None)
            return len(recent) < LOGIN_ATTEMPTS_PER_MINUTE

    def login_failed(self, client: str) -> None:
        with self._lock:
            self._attempts.setdefault(client, []).append(time.monotonic())


def get_dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard | None = getattr(request.app.state, "dashboard", None)
    if dashboard is None:
        raise HTTPException(503, "The dashboard is not configured on this server")
    return dashboard


DashboardDep = Annotated[Dashboard, Depends(get_dashboard)]


def current_session(request: Request, dashboard: DashboardDep) -> Session:
    session = dashboard.signer.read(request.cookies.get(COOKIE))
    if session is None:
        raise HTTPException(401, "Sign in first")
    # The users file is the authority: a removed user or a changed role applies at once.
    user = dashboard.users.users().get(session.user)
    if user is None:
        raise HTTPException(401, "Sign in first")
    return replace(session, role=user.role)


def requires(role: str) -> Any:
    def check(session: Annotated[Session, Depends(current_session)]) -> Session:
        if not role_allows(session.role, role):
            raise HTTPException(403, f"This needs the {role} role; you are {session.role}")
        return session

    return Depends(check)


Viewer = Annotated[Session, requires("viewer")]
Operator = Annotated[Session, requires("operator")]
Admin = Annotated[Session, requires("admin")]

router = APIRouter(prefix="/dashboard", include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    html = STATIC.joinpath("index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


@router.post("/auth/login")
def login(body: LoginIn, request: Request, response: Response, dashboard: DashboardDep) -> Any:
    client = request.client.host if request.client else "?"
    if not dashboard.allow_login_attempt(client):
        raise HTTPException(429, "Too many sign-in attempts; wait a minute")
    user = dashboard.users.authenticate(body.username, body.password)
    if user is None:
        dashboard.login_failed(client)
        raise HTTPException(401, "Unknown user or wrong password")
    response.set_cookie(
        COOKIE,
        dashboard.signer.issue(user),
        httponly=True,
        samesite="strict",
        secure=dashboard.secure_cookies,
        path="/dashboard",
    )
    return {"user": user.name, "role": user.role}


@router.post("/auth/logout")
def logout(request: Request, response: Response, dashboard: DashboardDep) -> Any:
    # Revoked server-side: a copy of the cookie kept elsewhere is refused from now on.
    dashboard.signer.revoke(request.cookies.get(COOKIE))
    response.delete_cookie(COOKIE, path="/dashboard")
    return {"signed_out": True}


@router.get("/api/me")
def me(session: Viewer) -> Any:
    return {
        "user": session.user,
        "role": session.role,
        "roles": list(ROLES),
        "metrics": views.metric_info(),
    }


@router.get("/api/overview")
def overview(session: Viewer, dashboard: DashboardDep) -> Any:
    return views.overview(
        dashboard.store,
        dashboard.reports,
        now_ms(),
        dashboard.window_s,
        dashboard.store.zone_shapes(),
    )


@router.get("/api/zones/{zone}")
def zone(
    zone: str,
    session: Viewer,
    dashboard: DashboardDep,
    range_: Annotated[str, Query(alias="range")] = "24h",
    start: datetime | None = None,
    end: datetime | None = None,
) -> Any:
    if zone not in {z.zone for z in dashboard.store.zones()}:
        raise HTTPException(404, f"Unknown zone {zone!r}")
    try:
        lo, hi = views.window_of(range_, start, end, now_ms())
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    page = views.zone_page(dashboard.store, zone, lo, hi)
    shape = {s.zone: s for s in dashboard.store.zone_shapes()}.get(zone)
    page["label"] = shape.label if shape else zone
    page["can_write_reports"] = role_allows(session.role, "operator")
    return page


@router.get("/api/alerts")
def alerts(request: Request, session: Operator) -> Any:
    """The open alerts and those resolved in the last 24 h, as ``GET /api/v1/alerts``
    gives them, for a signed-in operator or admin (the API itself takes tokens)."""
    return alert_routes.alerts(request, recent_hours=24, limit=20, deliveries=False)


@router.get("/api/devices")
def devices(session: Viewer, dashboard: DashboardDep) -> Any:
    return views.device_health(dashboard.store, now_ms(), dashboard.window_s)


class AskIn(BaseModel):
    question: str = Field(min_length=1, max_length=500)


@router.post("/api/ask")
def ask(body: AskIn, session: Viewer, dashboard: DashboardDep) -> Any:
    try:
        return dashboard.reports.ask(body.question).to_dict()
    except IntentError as exc:
        raise HTTPException(
            422, {"error": exc.code, "message": str(exc), "suggestions": list(exc.suggestions)}
        ) from None


class ReportIn(BaseModel):
    kind: str = Field(pattern="^(daily|weekly)$")
    zone: str | None = None


@router.post("/api/reports")
def write_report(body: ReportIn, session: Operator, dashboard: DashboardDep) -> Any:
    if body.zone is not None and body.zone not in {z.zone for z in dashboard.store.zones()}:
        raise HTTPException(404, f"Unknown zone {body.zone!r}")
    record = to_record(dashboard.reports.report(body.kind, body.zone))
    dashboard.store.save_report(record)
    return record_dict(dashboard.store.reports(scope=record.scope, kind=body.kind, limit=1)[0])


@router.get("/api/live")
async def live(request: Request, session: Viewer, dashboard: DashboardDep) -> StreamingResponse:
    """Server-sent events: each new newest reading per device and metric, as it is stored."""

    info = views.metric_info()

    async def events() -> AsyncIterator[str]:
        seen = {
            (r.device_id, r.metric): r.ts_ms
            for r in await run_in_threadpool(dashboard.store.latest)
        }
        yield "retry: 2000\n\n"
        quiet = 0.0
        while not await request.is_disconnected():
            await asyncio.sleep(dashboard.live_interval_s)
            fresh = []
            for r in await run_in_threadpool(dashboard.store.latest):
                key = (r.device_id, r.metric)
                if r.ts_ms > seen.get(key, -1):
                    seen[key] = r.ts_ms
                    fresh.append(r)
            for r in fresh:
                data = {
                    "device_id": r.device_id,
                    "zone": r.zone,
                    "metric": r.metric,
                    "label": info.get(r.metric, {}).get("label", r.metric),
                    "unit": info.get(r.metric, {}).get("unit", ""),
                    "digits": info.get(r.metric, {}).get("digits", 2),
                    "time": iso(r.ts_ms),
                    "value": r.value,
                }
                yield f"event: reading\ndata: {json.dumps(data)}\n\n"
            quiet = 0.0 if fresh else quiet + dashboard.live_interval_s
            if quiet >= 15:
                yield ": keep-alive\n\n"
                quiet = 0.0

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


# ------------------------------------------------------------------------- admin


class DeviceZoneIn(BaseModel):
    zone: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")


class ZoneIn(BaseModel):
    label: str = Field(min_length=1, max_length=80)
    geometry: dict[str, Any]


def _registry(dashboard: Dashboard) -> tuple[Registry, Path]:
    if dashboard.registry_path is None:
        raise HTTPException(409, "No registry file is configured (registry_file)")
    return RegistryFile(dashboard.registry_path).current(), dashboard.registry_path


@router.post("/api/admin/devices", status_code=201)
def register_device(body: DeviceIn, session: Admin, dashboard: DashboardDep) -> Any:
    if dashboard.registry_path is None:
        raise HTTPException(409, "No registry file is configured (registry_file)")
    record = add_device(dashboard.registry_path, dashboard.store, body)
    return {"device_id": record.device_id, "zone": record.zone}


@router.patch("/api/admin/devices/{device_id}")
def move_device(device_id: str, body: DeviceZoneIn, session: Admin, dashboard: DashboardDep) -> Any:
    registry, path = _registry(dashboard)
    record = registry.devices.get(device_id)
    if record is None:
        raise HTTPException(404, f"Device {device_id} is not registered")
    moved = replace(record, zone=body.zone)
    registry.with_device(moved).save(path)
    dashboard.store.upsert_devices([moved])
    return {"device_id": device_id, "zone": body.zone}


@router.get("/api/admin/zones")
def zone_shapes(session: Admin, dashboard: DashboardDep) -> Any:
    return [
        {"zone": s.zone, "label": s.label, "geometry": json.loads(s.geometry_json)}
        for s in dashboard.store.zone_shapes()
    ]


@router.put("/api/admin/zones/{zone}")
def edit_zone(zone: str, body: ZoneIn, session: Admin, dashboard: DashboardDep) -> Any:
    problem = geometry_problem(body.geometry)
    if problem:
        raise HTTPException(422, problem)
    text = json.dumps(body.geometry, separators=(",", ":"))
    if len(text) > MAX_GEOMETRY_BYTES:
        raise HTTPException(413, f"A zone shape of at most {MAX_GEOMETRY_BYTES} bytes")
    dashboard.store.save_zone_shape(ZoneShape(zone, body.label, text, now_ms()))
    return {"zone": zone, "label": body.label}


def geometry_problem(geometry: dict[str, Any]) -> str | None:
    """Why ``geometry`` is not a usable GeoJSON Polygon or MultiPolygon (None if it is)."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
    if not isinstance(polygons, list) or not polygons:
        return "geometry must be a GeoJSON Polygon or MultiPolygon"
    for polygon in polygons:
        if not isinstance(polygon, list) or not polygon:
            return "a polygon needs at least one ring"
        for ring in polygon:
            if not isinstance(ring, list) or len(ring) < 4 or ring[0] != ring[-1]:
                return "each ring needs 4 or more positions, the first repeated last"
            for pos in ring:
                if (
                    not isinstance(pos, list)
                    or len(pos) < 2
                    or not all(isinstance(v, int | float) for v in pos[:2])
                    or not (-180 <= pos[0] <= 180 and -90 <= pos[1] <= 90)
                ):
                    return "positions are [longitude, latitude] within range"
    return None


def seed_zone_shapes(store: Store, geojson_path: Path | None) -> int:
    """Store the shapes of a GeoJSON FeatureCollection (``properties.zone`` or ``name``)
    for zones that have none yet; the city's file is the starting point admins edit."""
    if geojson_path is None or not geojson_path.exists():
        return 0
    data = json.loads(geojson_path.read_text(encoding="utf-8"))
    have = {s.zone for s in store.zone_shapes()}
    added = 0
    for feature in data.get("features", []):
        props = feature.get("properties") or {}
        zone = props.get("zone") or props.get("name")
        geometry = feature.get("geometry") or {}
        if not zone or zone in have or geometry_problem(geometry):
            continue
        store.save_zone_shape(
            ZoneShape(zone, str(props.get("label") or zone), json.dumps(geometry), now_ms())
        )
        added += 1
    return added


def install(app: FastAPI, dashboard: Dashboard) -> None:
    """Mount the dashboard on ``app``: pages, static files, its API, ``/`` -> dashboard."""
    app.state.dashboard = dashboard
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=str(STATIC)), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")


def from_settings(settings: Any, store: Store, reports: ReportService) -> Dashboard | None:
    """The dashboard the settings describe (``AnalyticsSettings``), None when disabled;
    seeds zone shapes from ``dashboard.zones_geojson``."""
    d = settings.dashboard
    if not d.enabled:
        return None
    seed_zone_shapes(store, d.zones_geojson)
    return Dashboard(
        store,
        reports,
        UserFile(d.users_file),
        SessionSigner(d.session_key()),
        registry_path=settings.registry_file,
        window_s=settings.reports.window_s,
        live_interval_s=d.live_interval_s,
        secure_cookies=d.secure_cookies,
    )
