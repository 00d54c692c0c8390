"""The REST API of the central service (read-only), under ``/api/v1``.

Endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, which is
where the synchronous store belongs. Every number comes from the store; times are ISO
8601 UTC plus the exact epoch milliseconds used on the wire. ``/openapi.json`` and
``/docs`` describe every route.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from analytics import admin as admin_routes
from analytics import audit as audit_routes
from analytics.apiauth import ApiSecurity, BodyLimit, requires
from analytics.dashboard.routes import Dashboard
from analytics.dashboard.routes import install as install_dashboard
from analytics.metrics_export import CONTENT_TYPE, metrics_registry, render
from analytics.reports import routes as report_routes
from analytics.reports.service import ReportService
from analytics.store.base import Resolution, Store, StoreError, choose_resolution
from civicmesh import __version__
from civicmesh.metrics import BY_NAME, METRICS
from civicmesh.registry import RegistryFile
from civicmesh.timeutil import datetime_to_ms, ms_to_datetime, now_ms

PREFIX = "/api/v1"
DEFAULT_WINDOW_S = 60
ONLINE_WINDOWS = 3  # a device is online when its newest reading is this many windows old at most
DEFAULT_SERIES_SPAN = timedelta(hours=24)
MIN_BUCKET_S = 60
MAX_BUCKET_S = 31 * 24 * 3600
MAX_SERIES_POINTS = 10_000
KNOWN_METRICS = ", ".join(m.name for m in METRICS)
_NAMES_SHOWN = 20

StatsProvider = Callable[[], dict[str, Any]]


# --------------------------------------------------------------------------- models


class StoreCountsOut(BaseModel):
    batches: int = Field(description="Batches in the ledger")
    readings: int = Field(description="Readings stored")
    quarantined: int = Field(description="Quarantine records stored")


class HealthOut(BaseModel):
    status: str = Field(description='"ok", or "degraded" when ingest reports store errors')
    version: str = Field(description="civicmesh version")
    time: datetime = Field(description="Server time (UTC)")
    store_backend: str = Field(description="sqlite, postgresql or timescaledb")
    counts: StoreCountsOut
    registry: dict[str, int] | None = Field(
        default=None, description="Registered devices and gateways (when a registry is given)"
    )
    ingest: dict[str, Any] | None = Field(
        default=None, description="Counters of the in-process ingest worker, if any"
    )


class DeviceOut(BaseModel):
    device_id: str
    zone: str
    kind: str = Field(description="Sensor package: air, traffic or multi")
    lat: float | None
    lon: float | None
    status: str = Field(description="Registry status: active or revoked")
    last_seen: datetime | None = Field(description="Time of the newest stored reading (UTC)")
    last_seen_ms: int | None = Field(description="The same, epoch milliseconds")
    last_seq: int | None = Field(description="Highest stored batch sequence number")
    batches: int = Field(description="Batches stored for this device")
    online: bool = Field(description="Newest reading at most three windows old")


class ZoneOut(BaseModel):
    zone: str
    devices: int = Field(description="Registered devices in the zone")
    lat: float | None = Field(description="Mean latitude of its devices")
    lon: float | None = Field(description="Mean longitude of its devices")


class LatestOut(BaseModel):
    device_id: str
    zone: str
    metric: str
    unit: str
    time: datetime
    ts_ms: int
    value: float
    quality: int = Field(description="Quality flags (civicmesh.metrics.Quality bit field)")


class SeriesPointOut(BaseModel):
    start: datetime = Field(description="Bucket start (UTC), aligned to the bucket size")
    start_ms: int
    count: int = Field(description="Readings in the bucket")
    mean: float
    min: float
    max: float


class SeriesOut(BaseModel):
    metric: str
    unit: str
    zone: str | None
    device_id: str | None
    start: datetime
    end: datetime
    bucket_s: int
    resolution: str = Field(
        description='"raw" (bucketed from raw readings) or the rollup read: 1m, 1h or 1d'
    )
    points: list[SeriesPointOut]


class DeviceCompletenessOut(BaseModel):
    device_id: str
    zone: str
    metrics: int = Field(description="Metrics the device reported in the window")
    expected: int = Field(description="metrics x window / interval")
    received: int
    ratio: float = Field(description="received / expected, at most 1")


class ZoneCompletenessOut(BaseModel):
    zone: str
    devices: int = Field(description="Registered devices in the zone")
    reporting: int = Field(description="Devices with at least one reading in the window")
    expected: int
    received: int
    ratio: float = Field(description="received / expected over the reporting devices")


class CompletenessOut(BaseModel):
    start: datetime
    end: datetime
    interval_s: int
    devices: list[DeviceCompletenessOut]
    zones: list[ZoneCompletenessOut]


class AggregateOut(BaseModel):
    zone: str | None = Field(description="The zone, or null for the whole city")
    metric: str
    unit: str
    count: int
    mean: float
    min: float
    max: float


class AggregatesOut(BaseModel):
    start: datetime
    end: datetime
    resolution: str = Field(description='The rollup read ("raw": the readings themselves)')
    aggregates: list[AggregateOut]


class LedgerEntryOut(BaseModel):
    device_id: str
    seq: int
    payload_hash: str = Field(description="SHA-256 of the device payload bytes, hex")
    prev_hash: str = Field(description="The previous batch's payload hash, hex")
    gateway_id: str
    readings: int = Field(description="Readings stored from this batch")
    sealed_at: datetime
    received_at: datetime = Field(description="When the gateway received the batch")
    ingested_at: datetime
    device_message_b64: str = Field(description="The device's COSE_Sign1 bytes, base64")
    gateway_message_b64: str = Field(description="The gateway's envelope bytes, base64")


class QuarantineOut(BaseModel):
    reason: str = Field(description='Machine-readable reason, e.g. "signature.invalid"')
    detail: str
    source: str = Field(description='Who rejected it: "gw:<id>" or "ingest:<worker>"')
    topic: str
    received_at: datetime
    received_at_ms: int
    payload_size: int
    payload_sha256: str
    payload_b64: str = Field(description="Up to 64 KiB of the rejected bytes, base64")
    device_id: str | None
    seq: int | None


class ErrorOut(BaseModel):
    detail: str


# ----------------------------------------------------------------- dependencies


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_registry(request: Request) -> RegistryFile | None:
    registry: RegistryFile | None = request.app.state.registry
    return registry


def get_stats_provider(request: Request) -> StatsProvider | None:
    provider: StatsProvider | None = request.app.state.stats_provider
    return provider


StoreDep = Annotated[Store, Depends(get_store)]
RegistryDep = Annotated[RegistryFile | None, Depends(get_registry)]
StatsDep = Annotated[StatsProvider | None, Depends(get_stats_provider)]


# --------------------------------------------------------------------- helpers


def _iso(ms: int) -> datetime:
    return ms_to_datetime(ms)


def _utc_ms(value: datetime) -> int:
    # A time without offset is taken as UTC, the only zone the wire knows.
    return datetime_to_ms(value if value.tzinfo else value.replace(tzinfo=UTC))


def _names(values: list[str]) -> str:
    shown = ", ".join(sorted(values)[:_NAMES_SHOWN])
    more = len(values) - _NAMES_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown or "(none)"


def _require_zone(store: Store, zone: str) -> None:
    known = [z.zone for z in store.zones()]
    if zone not in known:
        raise HTTPException(404, f"Unknown zone {zone!r}; known zones: {_names(known)}")


def _require_device(store: Store, device_id: str) -> None:
    known = [d.device_id for d in store.devices()]
    if device_id not in known:
        raise HTTPException(404, f"Unknown device {device_id!r}; known devices: {_names(known)}")


def _window(start: datetime | None, end: datetime | None) -> tuple[int, int]:
    end_ms = now_ms() if end is None else _utc_ms(end)
    span_ms = int(DEFAULT_SERIES_SPAN.total_seconds() * 1000)
    start_ms = end_ms - span_ms if start is None else _utc_ms(start)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    return start_ms, end_ms


_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "The store is unavailable"},
}


# ---------------------------------------------------------------------- routes

# Every route needs a viewer token at least (when tokens are configured); raw payloads
# (quarantine) and metrics need an operator.
router = APIRouter(prefix=PREFIX, responses=_ERRORS, dependencies=[requires("viewer")])


@router.get("/health", response_model=HealthOut, summary="Service health", tags=["service"])
def health(store: StoreDep, registry: RegistryDep, stats: StatsDep) -> HealthOut:
    """Store backend and counts, registry size and the ingest worker's counters."""
    counts = store.counts()
    ingest = stats() if stats is not None else None
    status = "ok"
    if ingest is not None and (not ingest.get("store_ok", True) or not ingest.get("running", True)):
        status = "degraded"
    registered = None
    if registry is not None:
        current = registry.current()
        registered = {"devices": len(current.devices), "gateways": len(current.gateways)}
    return HealthOut(
        status=status,
        version=__version__,
        time=datetime.now(UTC),
        store_backend=store.backend,
        counts=StoreCountsOut(
            batches=counts.batches, readings=counts.readings, quarantined=counts.quarantined
        ),
        registry=registered,
        ingest=ingest,
    )


@router.get("/devices", response_model=list[DeviceOut], summary="Devices", tags=["devices"])
def devices(request: Request, store: StoreDep) -> list[DeviceOut]:
    """Every registered device with its newest reading time and ledger position."""
    online_after = now_ms() - ONLINE_WINDOWS * request.app.state.window_s * 1000
    return [
        DeviceOut(
            device_id=d.device_id,
            zone=d.zone,
            kind=d.kind,
            lat=d.lat,
            lon=d.lon,
            status=d.status,
            last_seen=None if d.last_seen_ms is None else _iso(d.last_seen_ms),
            last_seen_ms=d.last_seen_ms,
            last_seq=d.last_seq,
            batches=d.batches,
            online=d.last_seen_ms is not None and d.last_seen_ms >= online_after,
        )
        for d in store.devices()
    ]


@router.get("/zones", response_model=list[ZoneOut], summary="Zones", tags=["devices"])
def zones(store: StoreDep) -> list[ZoneOut]:
    """Zones with their device count and mean position."""
    return [ZoneOut(zone=z.zone, devices=z.devices, lat=z.lat, lon=z.lon) for z in store.zones()]


@router.get(
    "/latest",
    response_model=list[LatestOut],
    summary="Newest readings",
    tags=["readings"],
    responses={404: {"model": ErrorOut, "description": "Unknown zone"}},
)
def latest(
    store: StoreDep,
    zone: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Only this zone")
    ] = None,
) -> list[LatestOut]:
    """The newest reading of every device and metric."""
    if zone is not None:
        _require_zone(store, zone)
    return [
        LatestOut(
            device_id=r.device_id,
            zone=r.zone,
            metric=r.metric,
            unit=BY_NAME[r.metric].unit,
            time=_iso(r.ts_ms),
            ts_ms=r.ts_ms,
            value=r.value,
            quality=r.quality,
        )
        for r in store.latest(zone)
    ]


@router.get(
    "/series",
    response_model=SeriesOut,
    summary="Aggregated time series",
    tags=["readings"],
    responses={
        404: {"model": ErrorOut, "description": "Unknown zone or device"},
        422: {"description": "Unknown metric, bad time range or bucket"},
    },
)
def series(
    store: StoreDep,
    metric: Annotated[
        str, Query(min_length=1, max_length=64, description=f"One of: {KNOWN_METRICS}")
    ],
    zone: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Only devices of this zone")
    ] = None,
    device: Annotated[
        str | None, Query(min_length=1, max_length=64, description="Only this device")
    ] = None,
    start: Annotated[
        datetime | None, Query(description="Range start, ISO 8601 (default: end - 24 h)")
    ] = None,
    end: Annotated[
        datetime | None, Query(description="Range end, exclusive (default: now)")
    ] = None,
    bucket: Annotated[
        int | None,
        Query(
            ge=MIN_BUCKET_S,
            le=MAX_BUCKET_S,
            description="Bucket size in seconds, aggregated from raw readings "
            "(omit it to read a rollup chosen by `resolution`)",
        ),
    ] = None,
    resolution: Annotated[
        str,
        Query(
            pattern="^(auto|1m|1h|1d)$",
            description="Rollup to read when no bucket is given: auto picks the finest "
            "that answers the range in at most `points` buckets",
        ),
    ] = "auto",
    points: Annotated[
        int, Query(ge=1, le=MAX_SERIES_POINTS, description="Most buckets wanted (auto)")
    ] = 500,
) -> SeriesOut:
    """Count, mean, min and max of ``metric`` per bucket in ``[start, end)``.

    Buckets are aligned to the epoch; give ``zone`` or ``device`` (or neither for the
    whole city), not both. Without ``bucket`` the answer comes from the 1-minute, 1-hour
    or 1-day rollup (milliseconds over months of data); with ``bucket`` it is aggregated
    from raw readings.
    """
    if metric not in BY_NAME:
        raise HTTPException(422, f"Unknown metric {metric!r}; known metrics: {KNOWN_METRICS}")
    if zone is not None and device is not None:
        raise HTTPException(422, "Give zone or device, not both")
    start_ms, end_ms = _window(start, end)
    if bucket is not None:
        buckets = (end_ms - start_ms) // (bucket * 1000)
        if buckets > MAX_SERIES_POINTS:
            raise HTTPException(
                422,
                f"The range holds {buckets} buckets of {bucket} s; the limit is "
                f"{MAX_SERIES_POINTS}: choose a larger bucket or a shorter range",
            )
    if zone is not None:
        _require_zone(store, zone)
    if device is not None:
        _require_device(store, device)
    if bucket is not None:
        chosen = Resolution.RAW
        rows = store.series(metric, start_ms, end_ms, bucket, zone=zone, device_id=device)
    else:
        chosen = (
            choose_resolution(start_ms, end_ms, points)
            if resolution == "auto"
            else Resolution.parse(resolution)
        )
        rows = store.rollup_series(metric, start_ms, end_ms, chosen, zone=zone, device_id=device)
    return SeriesOut(
        metric=metric,
        unit=BY_NAME[metric].unit,
        zone=zone,
        device_id=device,
        start=_iso(start_ms),
        end=_iso(end_ms),
        bucket_s=bucket if bucket is not None else chosen.seconds,
        resolution=chosen.label,
        points=[
            SeriesPointOut(
                start=_iso(p.bucket_ms),
                start_ms=p.bucket_ms,
                count=p.count,
                mean=p.mean,
                min=p.min,
                max=p.max,
            )
            for p in rows
        ],
    )


@router.get(
    "/completeness",
    response_model=CompletenessOut,
    summary="Data completeness per device and zone",
    tags=["readings"],
    responses={404: {"model": ErrorOut, "description": "Unknown zone"}},
)
def completeness(
    store: StoreDep,
    zone: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Only this zone")
    ] = None,
    start: Annotated[
        datetime | None, Query(description="Window start (default: end - 24 h)")
    ] = None,
    end: Annotated[datetime | None, Query(description="Window end (default: now)")] = None,
    interval: Annotated[
        int, Query(ge=1, le=86_400, description="Expected seconds between readings")
    ] = DEFAULT_WINDOW_S,
) -> CompletenessOut:
    """Readings received against readings expected (one per ``interval`` and metric),
    per device and summed per zone (over the devices that reported at all)."""
    start_ms, end_ms = _window(start, end)
    if zone is not None:
        _require_zone(store, zone)
    rows = store.completeness(start_ms, end_ms, interval, zone=zone)
    zones: dict[str, list[int]] = {}
    for c in rows:
        totals = zones.setdefault(c.zone, [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += c.metrics > 0
        totals[2] += c.expected
        totals[3] += c.received
    return CompletenessOut(
        start=_iso(start_ms),
        end=_iso(end_ms),
        interval_s=interval,
        devices=[
            DeviceCompletenessOut(
                device_id=c.device_id,
                zone=c.zone,
                metrics=c.metrics,
                expected=c.expected,
                received=c.received,
                ratio=c.ratio,
            )
            for c in rows
        ],
        zones=[
            ZoneCompletenessOut(
                zone=name,
                devices=devices,
                reporting=reporting,
                expected=expected,
                received=received,
                ratio=0.0 if expected == 0 else min(1.0, received / expected),
            )
            for name, (devices, reporting, expected, received) in sorted(zones.items())
        ],
    )


@router.get(
    "/aggregates",
    response_model=AggregatesOut,
    summary="Every metric per zone and for the city",
    tags=["readings"],
)
def aggregates(
    store: StoreDep,
    start: Annotated[
        datetime | None, Query(description="Window start (default: end - 24 h)")
    ] = None,
    end: Annotated[datetime | None, Query(description="Window end (default: now)")] = None,
    resolution: Annotated[
        str, Query(pattern="^(raw|1m|1h|1d)$", description="Rollup to read (raw: readings)")
    ] = "1h",
) -> AggregatesOut:
    """Count, mean, min and max of each metric per zone and city-wide (zone null), over
    the buckets starting in ``[start, end)``: the numbers behind the city overview."""
    start_ms, end_ms = _window(start, end)
    chosen = Resolution.parse(resolution)
    return AggregatesOut(
        start=_iso(start_ms),
        end=_iso(end_ms),
        resolution=chosen.label,
        aggregates=[
            AggregateOut(
                zone=a.zone,
                metric=a.metric,
                unit=BY_NAME[a.metric].unit,
                count=a.count,
                mean=a.mean,
                min=a.min,
                max=a.max,
            )
            for a in store.zone_aggregates(start_ms, end_ms, chosen)
        ],
    )


@router.get(
    "/ledger/{device_id}",
    response_model=list[LedgerEntryOut],
    summary="Batch ledger of a device (audit)",
    tags=["audit"],
    responses={404: {"model": ErrorOut, "description": "Unknown device"}},
)
def ledger(
    store: StoreDep,
    device_id: Annotated[str, Path(min_length=1, max_length=64, description="Device id")],
    after_seq: Annotated[
        int, Query(ge=0, le=2**63 - 1, description="Only batches with a higher seq")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most entries returned")] = 100,
) -> list[LedgerEntryOut]:
    """Stored batches in seq order with hashes and the exact signed bytes.

    Anyone can re-verify: decode ``gateway_message_b64`` and ``device_message_b64`` and
    check both signatures and the hash chain (``prev_hash`` of each entry equals the
    ``payload_hash`` of the one before).
    """
    _require_device(store, device_id)
    return [
        LedgerEntryOut(
            device_id=e.device_id,
            seq=e.seq,
            payload_hash=e.payload_hash.hex(),
            prev_hash=e.prev_hash.hex(),
            gateway_id=e.gateway_id,
            readings=e.readings,
            sealed_at=_iso(e.sealed_at_ms),
            received_at=_iso(e.received_at_ms),
            ingested_at=_iso(e.ingested_at_ms),
            device_message_b64=base64.b64encode(e.device_message).decode("ascii"),
            gateway_message_b64=base64.b64encode(e.gateway_message).decode("ascii"),
        )
        for e in store.ledger(device_id, after_seq=after_seq, limit=limit)
    ]


@router.get(
    "/quarantine",
    dependencies=[requires("operator")],
    response_model=list[QuarantineOut],
    summary="Quarantined messages and readings",
    tags=["audit"],
)
def quarantine(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most records returned")] = 100,
) -> list[QuarantineOut]:
    """What gateways and ingest rejected, newest first, with the reason."""
    return [
        QuarantineOut(
            reason=q.reason,
            detail=q.detail,
            source=q.source,
            topic=q.topic,
            received_at=_iso(q.received_at_ms),
            received_at_ms=q.received_at_ms,
            payload_size=q.payload_size,
            payload_sha256=q.payload_sha256,
            payload_b64=q.payload_b64,
            device_id=q.device_id,
            seq=q.seq,
        )
        for q in store.quarantined(limit)
    ]


# ------------------------------------------------------------------------ app


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"The store is unavailable: {exc}"}, status_code=503)


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
) -> FastAPI:
    """The API application over ``store`` (thread-safe: the endpoints run in a thread pool).

    ``stats_provider`` (e.g. ``IngestWorker.stats``) feeds ``/health``; ``window_s`` is
    the devices' reading window, used for the online flag; ``reports`` serves
    ``/ask``, ``/reports`` and ``/facts``.
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
    app.include_router(router)
    app.state.reports = reports
    app.include_router(report_routes.router)
    app.include_router(admin_routes.router)
    audit_routes.install(app)  # public: the audit log needs no token
    if dashboard is not None:
        install_dashboard(app, dashboard)
    if stats_provider is not None:
        registry_ = metrics_registry(stats_provider)

        @app.get("/metrics", include_in_schema=False, dependencies=[requires("operator")])
        def metrics() -> Response:
            """Prometheus text format: the in-process ingest worker's counters."""
            return Response(render(registry_), media_type=CONTENT_TYPE)

    return app
