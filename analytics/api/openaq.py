"""OpenAQ v3-compatible reads under ``/openaq/v3``: what the ``openaq`` Python SDK and
other OpenAQ clients read, over the same store as ``/api/v1``.

Mapping (docs/open-data.md has the whole table):

- one registered **device** is one OpenAQ *location*; one device x metric is a *sensor*;
  civicmesh metrics are OpenAQ *parameters*.
- **Ids are stable integers derived from the device id alone** (no table to keep):
  ``location_id = sha256("civicmesh/openaq/location/" + device_id)`` read as a big-endian
  integer, modulo 2^27 - 1, plus 1; ``sensor_id = location_id * 16 + metric code``
  (metric codes are the wire codes, all below 16), so a sensor id names its location.
  Both fit the SDK's int32 check. A hash collision between two devices (about 1 in
  7,000 for 200 devices) is resolved by sorting the colliding device ids and rehashing
  the later one with a ``#1``, ``#2`` suffix.
- **Parameters** use OpenAQ's own ids where the unit matches (pm10 1, pm25 2, o3 3,
  no2 5, relativehumidity 98, temperature 100); co (mg/m³) and the traffic metrics,
  which OpenAQ has not in these units, get ``10000 + metric code``.
- Every measurement carries ``flagInfo`` (OpenAQ's field: ``hasFlags``, plus the
  civicmesh quality bits and their names) and ``provenance`` (``device-signed`` for a
  field device's verified batches, ``imported`` for a station ``civicmesh import``
  sealed from an archive). Rollup aggregates keep no quality flags: their
  ``flagInfo.hasFlags`` is null and says so.

Every response carries ``x-ratelimit-limit/remaining/used/reset`` (the SDK waits a full
minute before its next request when they are missing).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from analytics.api.common import ERRORS, MAX_SERIES_POINTS, StoreDep, utc_ms
from analytics.apiauth import ApiSecurity, requires
from analytics.export import provenance
from analytics.store.base import DeviceStatus, LatestReading, Resolution, SeriesPoint, Store
from civicmesh.metrics import BY_CODE, BY_NAME, METRICS, Metric, Quality
from civicmesh.protocol import Reading
from civicmesh.timeutil import now_ms

PREFIX = "/openaq/v3"
API_NAME = "civicmesh-openaq"
WEBSITE = "/openaq/v3"
MAX_LIMIT = 1000
RAW_MAX_DAYS = 31  # one raw request reads its whole window; longer ones use /hours, /days
DEFAULT_RAW_SPAN = timedelta(days=7)
RAW_SLICE_MS = 6 * 3_600_000  # raw pages are read this much at a time
NETWORK_TTL_S = 2.0
UNLIMITED = 1_000_000  # reported when the API runs without a rate limiter (development)

_LOCATION_SPACE = (1 << 27) - 1
METRIC_SLOTS = 16
if max(m.code for m in METRICS) >= METRIC_SLOTS:  # pragma: no cover - a catalogue change
    raise RuntimeError("metric codes >= 16 need a new sensor id scheme (analytics/api/openaq)")

# OpenAQ's parameter ids for the metrics it has in the same unit.
OPENAQ_PARAMETER_IDS = {
    "pm10": 1,
    "pm25": 2,
    "o3": 3,
    "no2": 5,
    "relativehumidity": 98,
    "temperature": 100,
}
DISPLAY_NAMES = {
    "pm25": "PM2.5",
    "pm10": "PM10",
    "no2": "NO₂",
    "o3": "O₃",
    "co": "CO",
    "temperature": "Temperature",
    "relativehumidity": "RH",
    "vehicle_count": "Vehicles",
    "mean_speed": "Mean speed",
    "occupancy": "Occupancy",
}
METEOROLOGICAL = frozenset({"temperature", "relativehumidity"})

router = APIRouter(
    prefix=PREFIX, responses=ERRORS, dependencies=[requires("viewer")], tags=["openaq v3"]
)


# -- ids ----------------------------------------------------------------------------


def location_id(device_id: str, attempt: int = 0) -> int:
    """The OpenAQ location id of ``device_id`` (``attempt`` > 0 only after a collision)."""
    name = device_id if attempt == 0 else f"{device_id}#{attempt}"
    digest = hashlib.sha256(f"civicmesh/openaq/location/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _LOCATION_SPACE + 1


def sensor_id(location: int, metric: str) -> int:
    return location * METRIC_SLOTS + BY_NAME[metric].code


def parameter_id(metric: str) -> int:
    return OPENAQ_PARAMETER_IDS.get(metric, 10_000 + BY_NAME[metric].code)


PARAMETER_BY_ID: dict[int, Metric] = {parameter_id(m.name): m for m in METRICS}


@dataclass(frozen=True, slots=True)
class Network:
    """The store's devices under their OpenAQ ids, and the metrics each has reported."""

    by_location: dict[int, DeviceStatus]
    location_of: dict[str, int]
    latest: dict[str, list[LatestReading]]  # device id -> newest reading per metric

    @classmethod
    def read(cls, store: Store) -> Network:
        by_location: dict[int, DeviceStatus] = {}
        for device in sorted(store.devices(), key=lambda d: d.device_id):
            attempt = 0
            while (lid := location_id(device.device_id, attempt)) in by_location:
                attempt += 1
            by_location[lid] = device
        latest: dict[str, list[LatestReading]] = {}
        for reading in store.latest():
            latest.setdefault(reading.device_id, []).append(reading)
        for readings in latest.values():
            readings.sort(key=lambda r: BY_NAME[r.metric].code)
        location_of = {d.device_id: lid for lid, d in by_location.items()}
        return cls(by_location, location_of, latest)

    @classmethod
    def cached(cls, request: Request, store: Store) -> Network:
        """The app's network as read at most NETWORK_TTL_S ago, for the measurement
        routes: paging through a sensor asks which device it is many times a second, and
        the device list is the slowest part of a page. (A new device's sensors answer that
        much later; the metadata routes and every reading are read fresh.)"""
        state = request.app.state
        held: tuple[float, Network] | None = getattr(state, "openaq_network", None)
        now = time.monotonic()
        if held is not None and now - held[0] < NETWORK_TTL_S:
            return held[1]
        network = cls.read(store)
        state.openaq_network = (now, network)
        return network

    def device(self, location: int) -> DeviceStatus:
        device = self.by_location.get(location)
        if device is None:
            raise HTTPException(404, f"No location with id {location}")
        return device

    def sensor(self, sensor: int) -> tuple[DeviceStatus, Metric]:
        device = self.by_location.get(sensor // METRIC_SLOTS)
        metric = BY_CODE.get(sensor % METRIC_SLOTS)
        if device is None or metric is None:
            raise HTTPException(404, f"No sensor with id {sensor}")
        if not any(r.metric == metric.name for r in self.latest.get(device.device_id, [])):
            raise HTTPException(
                404, f"No sensor with id {sensor} (the device has no {metric.name})"
            )
        return device, metric


# -- shapes ---------------------------------------------------------------------------


class Shapes:
    """Builds OpenAQ's camelCase records; times in UTC and in the city's time zone."""

    def __init__(self, tz: ZoneInfo, window_s: int) -> None:
        self.tz = tz
        self.window_s = window_s
        self.interval = hms(window_s)
        # A page formats up to 2,000 times: the hour's text and the zone's offset are
        # computed once per hour and per quarter hour (UTC offsets and the instants at
        # which they change are whole quarter hours).
        self._hours: dict[int, str] = {}
        self._offsets: dict[int, tuple[int, str]] = {}

    def _stamp(self, ms: int) -> str:
        """``YYYY-MM-DDTHH:MM:SS`` of ``ms`` read as UTC (whole seconds, as OpenAQ)."""
        hour = ms - ms % 3_600_000
        text = self._hours.get(hour)
        if text is None:
            text = datetime.fromtimestamp(hour // 1000, UTC).strftime("%Y-%m-%dT%H:")
            self._hours[hour] = text
        rest = (ms - hour) // 1000
        return f"{text}{rest // 60:02d}:{rest % 60:02d}"

    def _offset(self, ms: int) -> tuple[int, str]:
        quarter = ms // 900_000
        offset = self._offsets.get(quarter)
        if offset is None:
            delta = datetime.fromtimestamp(ms // 1000, UTC).astimezone(self.tz).utcoffset()
            seconds = int(delta.total_seconds()) if delta is not None else 0
            sign, minutes = ("-" if seconds < 0 else "+"), abs(seconds) // 60
            offset = (seconds * 1000, f"{sign}{minutes // 60:02d}:{minutes % 60:02d}")
            self._offsets[quarter] = offset
        return offset

    def when(self, ms: int) -> dict[str, str]:
        """OpenAQ's ``{utc, local}`` pair: ``...Z`` and the city's wall time with offset."""
        shift, suffix = self._offset(ms)
        return {"utc": self._stamp(ms) + "Z", "local": self._stamp(ms + shift) + suffix}

    @staticmethod
    def parameter(metric: Metric) -> dict[str, Any]:
        return {
            "id": parameter_id(metric.name),
            "name": metric.name,
            "units": metric.unit,
            "displayName": DISPLAY_NAMES.get(metric.name, metric.name),
        }

    @staticmethod
    def coordinates(device: DeviceStatus) -> dict[str, float] | None:
        if device.lat is None or device.lon is None:
            return None
        return {"latitude": device.lat, "longitude": device.lon}

    def sensor(self, lid: int, device: DeviceStatus, latest: LatestReading) -> dict[str, Any]:
        metric = BY_NAME[latest.metric]
        return {
            "id": sensor_id(lid, metric.name),
            "name": f"{metric.name} {metric.unit}",
            "parameter": self.parameter(metric) | {"description": metric.description},
            "datetimeFirst": None,  # the store keeps no first-reading time per device
            "datetimeLast": self.when(latest.ts_ms),
            "coverage": None,
            "latest": {
                "datetime": self.when(latest.ts_ms),
                "value": latest.value,
                "coordinates": self.coordinates(device),
            },
            "summary": None,
            "locationsId": lid,
            "flagInfo": flag_info(latest.quality),
            "provenance": {"source": provenance(device), "deviceId": device.device_id},
        }

    def location(
        self,
        lid: int,
        device: DeviceStatus,
        latest: list[LatestReading],
        distance: float | None = None,
    ) -> dict[str, Any]:
        coordinates = self.coordinates(device)
        return {
            "id": lid,
            "name": device.device_id,
            "locality": device.zone,
            "timezone": str(self.tz),
            "country": {"id": 0, "code": "", "name": ""},  # not configured in civicmesh
            "owner": {"id": 0, "name": "civicmesh node operator"},
            "provider": {"id": 0, "name": "civicmesh"},
            "isMobile": False,
            "isMonitor": False,  # low-cost sensors, not reference monitors
            "instruments": [{"id": 0, "name": f"civicmesh {device.kind} node"}],
            "sensors": [
                {
                    "id": sensor_id(lid, r.metric),
                    "name": f"{r.metric} {BY_NAME[r.metric].unit}",
                    "parameter": self.parameter(BY_NAME[r.metric]),
                }
                for r in latest
            ],
            "coordinates": coordinates,
            "licenses": None,
            "bounds": None
            if coordinates is None
            else [device.lon, device.lat, device.lon, device.lat],
            "distance": distance,
            "datetimeFirst": None,
            "datetimeLast": None if device.last_seen_ms is None else self.when(device.last_seen_ms),
            "status": device.status,
            "deviceId": device.device_id,
        }

    def raw(self, device: DeviceStatus, readings: list[Reading]) -> list[dict[str, Any]]:
        """Measurement records of one device's readings; the parts they share (parameter,
        flags, provenance) are built once per page."""
        source = {"source": provenance(device), "deviceId": device.device_id}
        params = {m: self.parameter(BY_NAME[m]) for m in {r.metric for r in readings}}
        flags = {q: flag_info(q) for q in {r.quality for r in readings}}
        return [self._raw(r, params[r.metric], flags[r.quality], source) for r in readings]

    def _raw(
        self,
        reading: Reading,
        parameter: dict[str, Any],
        flags: dict[str, Any],
        source: dict[str, str],
    ) -> dict[str, Any]:
        start, end = reading.ts_ms, reading.ts_ms + self.window_s * 1000
        interval = self.interval
        begins, ends = self.when(start), self.when(end)  # shared by period and coverage
        return {
            "value": reading.value,
            "flagInfo": flags,
            "anomalyScore": reading.anomaly,
            "parameter": parameter,
            "period": {
                "label": "raw",
                "interval": interval,
                "datetimeFrom": begins,
                "datetimeTo": ends,
            },
            "coordinates": None,  # stationary: the location has them
            "summary": None,
            "coverage": {
                "expectedCount": 1,
                "expectedInterval": interval,
                "observedCount": 1,
                "observedInterval": interval,
                "percentComplete": 100.0,
                "percentCoverage": 100.0,
                "datetimeFrom": begins,
                "datetimeTo": ends,
            },
            "provenance": source,
        }

    def aggregate(
        self, device: DeviceStatus, metric: Metric, point: SeriesPoint, resolution: Resolution
    ) -> dict[str, Any]:
        start, end = point.bucket_ms, point.bucket_ms + resolution.seconds * 1000
        begins, ends = self.when(start), self.when(end)
        expected = max(1, resolution.seconds // self.window_s)
        percent = round(min(100.0, 100.0 * point.count / expected), 2)
        return {
            "value": point.mean,
            "flagInfo": {
                "hasFlags": None,
                "flags": None,
                "detail": "rollups keep no quality flags; the raw measurements carry them",
            },
            "parameter": self.parameter(metric),
            "period": {
                "label": "1hour" if resolution is Resolution.HOUR else "1day",
                "interval": hms(resolution.seconds),
                "datetimeFrom": begins,
                "datetimeTo": ends,
            },
            "coordinates": None,
            "summary": {
                "min": point.min,
                "q02": None,  # rollups keep count, sum, min and max only
                "q25": None,
                "median": None,
                "q75": None,
                "q98": None,
                "max": point.max,
                "avg": point.mean,
                "sd": None,
            },
            "coverage": {
                "expectedCount": expected,
                "expectedInterval": hms(resolution.seconds),
                "observedCount": point.count,
                "observedInterval": hms(point.count * self.window_s),
                "percentComplete": percent,
                "percentCoverage": percent,
                "datetimeFrom": begins,
                "datetimeTo": ends,
            },
            "provenance": {
                "source": provenance(device),
                "deviceId": device.device_id,
                "resolution": resolution.label,
            },
        }


def flag_info(quality: int) -> dict[str, Any]:
    names = [flag.name.lower() for flag in Quality if flag and quality & flag and flag.name]
    return {"hasFlags": quality != 0, "flags": names, "quality": quality}


def hms(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def shapes(request: Request) -> Shapes:
    reports = getattr(request.app.state, "reports", None)
    tz = ZoneInfo(getattr(reports, "timezone", "UTC"))
    return Shapes(tz, int(request.app.state.window_s))


def envelope(
    results: list[dict[str, Any]], *, page: int, limit: int, found: int | str
) -> JSONResponse:
    """OpenAQ's ``{meta, results}``, serialized directly: FastAPI's generic encoder
    would walk every value of a 1,000-measurement page once more (several times slower)."""
    meta = {"name": API_NAME, "website": WEBSITE, "page": page, "limit": limit, "found": found}
    return JSONResponse({"meta": meta, "results": results})


def paged(items: list[Any], page: int, limit: int) -> list[Any]:
    return items[(page - 1) * limit : page * limit]


# -- query parameters --------------------------------------------------------------------

Page = Annotated[int, Query(ge=1, le=1_000_000, description="Page number, from 1")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Results per page (1 to 1000)")]
LocationId = Annotated[int, Path(ge=1, lt=1 << 31, description="A location (device) id")]
SensorId = Annotated[int, Path(ge=1, lt=1 << 31, description="A sensor (device x metric) id")]


def numbers(text: str, count: int, name: str, shape: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise HTTPException(422, f"{name} must be {shape}, e.g. {name}=" + _EXAMPLES[name])
    return values


_EXAMPLES = {"coordinates": "52.52,13.405", "bbox": "13.3,52.4,13.5,52.6"}


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * math.asin(math.sqrt(min(1.0, a)))


@dataclass(frozen=True, slots=True)
class Area:
    """A ``coordinates`` + ``radius`` circle or a ``bbox``."""

    center: tuple[float, float] | None = None
    radius_m: int | None = None
    bbox: tuple[float, float, float, float] | None = None

    @classmethod
    def parse(cls, coordinates: str | None, radius: int | None, bbox: str | None) -> Area:
        if bbox is not None and (coordinates is not None or radius is not None):
            raise HTTPException(422, "Give coordinates and radius, or bbox, not both")
        if (coordinates is None) != (radius is None):
            raise HTTPException(422, "coordinates and radius go together (radius in metres)")
        if coordinates is not None and radius is not None:
            lat, lon = numbers(coordinates, 2, "coordinates", "latitude,longitude")
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise HTTPException(422, f"coordinates {lat},{lon} are outside WGS 84")
            return cls(center=(lat, lon), radius_m=radius)
        if bbox is not None:
            w, s, e, n = numbers(bbox, 4, "bbox", "min_lon,min_lat,max_lon,max_lat")
            if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
                raise HTTPException(
                    422, "bbox must be min_lon,min_lat,max_lon,max_lat with min <= max in WGS 84"
                )
            return cls(bbox=(w, s, e, n))
        return cls()

    def distance(self, device: DeviceStatus) -> float | bool:
        """The distance in metres (circle), True (inside the bbox or no area), False (out)."""
        if self.center is None and self.bbox is None:
            return True
        if device.lat is None or device.lon is None:
            return False
        if self.center is not None and self.radius_m is not None:
            metres = haversine_m(self.center[0], self.center[1], device.lat, device.lon)
            return round(metres, 1) if metres <= self.radius_m else False
        assert self.bbox is not None
        w, s, e, n = self.bbox
        return w <= device.lon <= e and s <= device.lat <= n


def id_list(text: str | None, name: str) -> set[int] | None:
    if text is None:
        return None
    try:
        return {int(p) for p in text.split(",")}
    except ValueError:
        raise HTTPException(422, f"{name} must be integers separated by commas") from None


# -- routes -----------------------------------------------------------------------------


@router.get("/parameters", summary="Parameters (civicmesh metrics)")
def parameters(
    page: Page = 1,
    limit: Limit = 100,
    parameter_type: Annotated[
        str | None, Query(pattern="^(pollutant|meteorological)$", description="Filter by type")
    ] = None,
) -> JSONResponse:
    """Every metric civicmesh measures, with OpenAQ's ids where they exist."""
    items = [
        Shapes.parameter(m) | {"description": m.description}
        for m in sorted(METRICS, key=lambda m: parameter_id(m.name))
        if parameter_type is None or (m.name in METEOROLOGICAL) == (parameter_type != "pollutant")
    ]
    return envelope(paged(items, page, limit), page=page, limit=limit, found=len(items))


@router.get("/parameters/{parameters_id}", summary="One parameter")
def parameter(
    parameters_id: Annotated[int, Path(ge=1, lt=1 << 31, description="A parameter id")],
) -> JSONResponse:
    metric = PARAMETER_BY_ID.get(parameters_id)
    if metric is None:
        known = ", ".join(f"{pid} ({m.name})" for pid, m in sorted(PARAMETER_BY_ID.items()))
        raise HTTPException(404, f"No parameter with id {parameters_id}; known: {known}")
    return envelope(
        [Shapes.parameter(metric) | {"description": metric.description}],
        page=1,
        limit=100,
        found=1,
    )


@router.get("/locations", summary="Locations (devices), by area")
def locations(
    request: Request,
    store: StoreDep,
    page: Page = 1,
    limit: Limit = 100,
    coordinates: Annotated[
        str | None, Query(max_length=64, description="Circle centre: latitude,longitude")
    ] = None,
    radius: Annotated[
        int | None, Query(ge=1, le=25_000, description="Circle radius in metres (1 to 25000)")
    ] = None,
    bbox: Annotated[
        str | None, Query(max_length=128, description="min_lon,min_lat,max_lon,max_lat")
    ] = None,
    parameters_id: Annotated[
        str | None, Query(max_length=256, description="Only locations measuring these ids")
    ] = None,
) -> JSONResponse:
    """Devices as OpenAQ locations, ordered by id (by distance for a coordinates search)."""
    area = Area.parse(coordinates, radius, bbox)
    wanted = id_list(parameters_id, "parameters_id")
    network = Network.read(store)
    shape = shapes(request)
    found: list[tuple[float, int, dict[str, Any]]] = []
    for lid, device in sorted(network.by_location.items()):
        where = area.distance(device)
        if where is False:
            continue
        latest = network.latest.get(device.device_id, [])
        if wanted is not None and not wanted & {parameter_id(r.metric) for r in latest}:
            continue
        distance = where if isinstance(where, float) else None
        record = shape.location(lid, device, latest, distance)
        found.append((distance or 0.0, lid, record))
    found.sort(key=lambda item: (item[0], item[1]))
    results = [record for _, _, record in found]
    return envelope(paged(results, page, limit), page=page, limit=limit, found=len(results))


@router.get("/locations/{locations_id}", summary="One location (device)")
def location(request: Request, store: StoreDep, locations_id: LocationId) -> JSONResponse:
    network = Network.read(store)
    device = network.device(locations_id)
    latest = network.latest.get(device.device_id, [])
    record = shapes(request).location(locations_id, device, latest)
    return envelope([record], page=1, limit=100, found=1)


@router.get("/locations/{locations_id}/sensors", summary="A location's sensors")
def location_sensors(request: Request, store: StoreDep, locations_id: LocationId) -> JSONResponse:
    network = Network.read(store)
    device = network.device(locations_id)
    shape = shapes(request)
    results = [
        shape.sensor(locations_id, device, r) for r in network.latest.get(device.device_id, [])
    ]
    return envelope(results, page=1, limit=100, found=len(results))


@router.get("/locations/{locations_id}/latest", summary="A location's newest values")
def location_latest(request: Request, store: StoreDep, locations_id: LocationId) -> JSONResponse:
    network = Network.read(store)
    device = network.device(locations_id)
    shape = shapes(request)
    results = [
        {
            "datetime": shape.when(r.ts_ms),
            "value": r.value,
            "coordinates": shape.coordinates(device),
            "sensorsId": sensor_id(locations_id, r.metric),
            "locationsId": locations_id,
            "flagInfo": flag_info(r.quality),
            "provenance": {"source": provenance(device), "deviceId": device.device_id},
        }
        for r in network.latest.get(device.device_id, [])
    ]
    return envelope(results, page=1, limit=100, found=len(results))


@router.get("/sensors/{sensors_id}", summary="One sensor (device x metric)")
def sensor(request: Request, store: StoreDep, sensors_id: SensorId) -> JSONResponse:
    network = Network.read(store)
    device, metric = network.sensor(sensors_id)
    latest = next(r for r in network.latest[device.device_id] if r.metric == metric.name)
    record = shapes(request).sensor(sensors_id // METRIC_SLOTS, device, latest)
    return envelope([record], page=1, limit=100, found=1)


DatetimeFrom = Annotated[
    datetime | None, Query(description="Start, ISO 8601 (inclusive; UTC when no offset)")
]
DatetimeTo = Annotated[datetime | None, Query(description="End, ISO 8601 (exclusive)")]


def _window(
    start: datetime | None, end: datetime | None, default_span: timedelta
) -> tuple[int, int]:
    end_ms = now_ms() if end is None else utc_ms(end)
    start_ms = end_ms - int(default_span.total_seconds() * 1000) if start is None else utc_ms(start)
    if start_ms >= end_ms:
        raise HTTPException(422, "datetime_from must be before datetime_to")
    return start_ms, end_ms


@router.get("/sensors/{sensors_id}/measurements", summary="A sensor's raw measurements")
def measurements(
    request: Request,
    store: StoreDep,
    sensors_id: SensorId,
    datetime_from: DatetimeFrom = None,
    datetime_to: DatetimeTo = None,
    page: Page = 1,
    limit: Limit = 100,
) -> JSONResponse:
    """Every stored reading, oldest first (default window: the 7 days before
    ``datetime_to``; at most 31 days a request: page through longer ranges by window, or
    read ``/hours`` and ``/days``)."""
    start_ms, end_ms = _window(datetime_from, datetime_to, DEFAULT_RAW_SPAN)
    if end_ms - start_ms > RAW_MAX_DAYS * 86_400_000:
        raise HTTPException(
            422,
            f"Raw measurements span at most {RAW_MAX_DAYS} days a request; narrow "
            "datetime_from/datetime_to or read the hourly or daily aggregates",
        )
    network = Network.cached(request, store)
    device, metric = network.sensor(sensors_id)
    readings, complete = _read_through(
        store, device.device_id, metric.name, start_ms, end_ms, page * limit
    )
    results = shapes(request).raw(device, paged(readings, page, limit))
    # As OpenAQ does: the exact count once the window is read to its end, else ">N".
    found: int | str = len(readings) if complete else f">{page * limit}"
    return envelope(results, page=page, limit=limit, found=found)


def _read_through(
    store: Store, device_id: str, metric: str, start_ms: int, end_ms: int, wanted: int
) -> tuple[list[Reading], bool]:
    """The window's readings, oldest first, read in slices of RAW_SLICE until more than
    ``wanted`` are in hand: a page costs what precedes it, not the whole window. The
    flag says whether the window was read to its end (so the count is exact)."""
    readings: list[Reading] = []
    for lo in range(start_ms, end_ms, RAW_SLICE_MS):
        readings += store.readings(device_id, lo, min(end_ms, lo + RAW_SLICE_MS), metric)
        if len(readings) > wanted:
            return readings, lo + RAW_SLICE_MS >= end_ms
    return readings, True


def _aggregates(
    request: Request,
    store: StoreDep,
    sensors_id: int,
    window: tuple[int, int],
    resolution: Resolution,
    page: int,
    limit: int,
) -> JSONResponse:
    start_ms, end_ms = window
    step = resolution.seconds * 1000
    if (end_ms - start_ms) // step > MAX_SERIES_POINTS:
        raise HTTPException(
            422,
            f"The range holds more than {MAX_SERIES_POINTS} {resolution.label} buckets; "
            "shorten it or read the daily aggregates",
        )
    network = Network.cached(request, store)
    device, metric = network.sensor(sensors_id)
    points = store.rollup_series(
        metric.name, start_ms, end_ms, resolution, device_id=device.device_id
    )
    shape = shapes(request)
    results = [shape.aggregate(device, metric, p, resolution) for p in paged(points, page, limit)]
    return envelope(results, page=page, limit=limit, found=len(points))


def _register_aggregates() -> None:
    """``/measurements/hourly``, ``/hours`` (the 1-hour rollup) and
    ``/measurements/daily``, ``/hours/daily`` (the 1-day rollup), as the SDK names them."""

    def hourly(
        request: Request,
        store: StoreDep,
        sensors_id: SensorId,
        datetime_from: DatetimeFrom = None,
        datetime_to: DatetimeTo = None,
        page: Page = 1,
        limit: Limit = 100,
    ) -> JSONResponse:
        """Hourly means (with count, min and max) from the 1-hour rollup, oldest first
        (default window: the 7 days before ``datetime_to``)."""
        window = _window(datetime_from, datetime_to, DEFAULT_RAW_SPAN)
        return _aggregates(request, store, sensors_id, window, Resolution.HOUR, page, limit)

    def daily(
        request: Request,
        store: StoreDep,
        sensors_id: SensorId,
        datetime_from: DatetimeFrom = None,
        datetime_to: DatetimeTo = None,
        page: Page = 1,
        limit: Limit = 100,
    ) -> JSONResponse:
        """Daily (UTC days) means from the 1-day rollup (default window: 90 days)."""
        window = _window(datetime_from, datetime_to, timedelta(days=90))
        return _aggregates(request, store, sensors_id, window, Resolution.DAY, page, limit)

    for path in ("/sensors/{sensors_id}/measurements/hourly", "/sensors/{sensors_id}/hours"):
        router.add_api_route(path, hourly, methods=["GET"], summary="Hourly aggregates")
    for path in ("/sensors/{sensors_id}/measurements/daily", "/sensors/{sensors_id}/hours/daily"):
        router.add_api_route(path, daily, methods=["GET"], summary="Daily aggregates")


_register_aggregates()


@router.get("/sensors/{sensors_id}/days", summary="Daily aggregates by date")
def days(
    request: Request,
    store: StoreDep,
    sensors_id: SensorId,
    date_from: Annotated[date | None, Query(description="First UTC day (inclusive)")] = None,
    date_to: Annotated[date | None, Query(description="Last UTC day (inclusive)")] = None,
    page: Page = 1,
    limit: Limit = 100,
) -> JSONResponse:
    """Daily means from the 1-day rollup for the UTC days ``date_from``..``date_to``."""
    end = date_to or datetime.now(UTC).date()
    start = date_from or end - timedelta(days=89)
    window = (_day_ms(start), _day_ms(end + timedelta(days=1)))
    if window[0] >= window[1]:
        raise HTTPException(422, "date_from must not be after date_to")
    return _aggregates(request, store, sensors_id, window, Resolution.DAY, page, limit)


def _day_ms(day: date) -> int:
    return utc_ms(datetime(day.year, day.month, day.day, tzinfo=UTC))


# -- rate-limit headers -----------------------------------------------------------------


class RateLimitHeaders:
    """ASGI middleware: ``x-ratelimit-limit/remaining/used/reset`` on every response
    under ``/openaq/v3``, from the same token bucket that limits the caller (the token's
    name, or the client address)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        security: ApiSecurity | None = getattr(scope["app"].state, "api_security", None)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                values = rate_headers(security, scope)
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.encode(), str(v).encode()) for k, v in values.items()),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


def rate_headers(security: ApiSecurity | None, scope: Scope) -> dict[str, int]:
    if security is None:
        return _rate(UNLIMITED, UNLIMITED, 0)
    limiter = security.limiter
    key = _caller(security, scope)
    level = limiter.level(key)
    remaining = int(level)
    # Seconds until the next request is allowed (when none is), else until the bucket
    # is full again: the SDK waits ``reset`` seconds once ``remaining`` reaches 0.
    missing = (1.0 - level) if remaining < 1 else (limiter.burst - level)
    return _rate(limiter.burst, remaining, math.ceil(max(0.0, missing) / limiter.rate))


def _rate(limit: int, remaining: int, reset: int) -> dict[str, int]:
    return {
        "x-ratelimit-limit": limit,
        "x-ratelimit-remaining": remaining,
        "x-ratelimit-used": limit - remaining,
        "x-ratelimit-reset": reset,
    }


def _caller(security: ApiSecurity, scope: Scope) -> str:
    client = scope.get("client")
    address = str(client[0]) if client else "?"
    if security.tokens is None:
        return address
    header = Headers(scope=scope).get("authorization", "")
    if header.lower().startswith("bearer "):
        token = security.tokens.authenticate(header[7:].strip())
        if token is not None:
            return token.name
    return address


def install(app: FastAPI) -> None:
    """Add the ``/openaq/v3`` routes and their rate-limit headers to ``app``."""
    app.include_router(router)
    app.add_middleware(RateLimitHeaders)
