"""What the dashboard pages show, computed from the store: plain functions returning
JSON-ready dicts, so the routes stay thin and the tests can call them directly."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from analytics import aqi
from analytics.reports.facts import LABELS, current_aqi, iso
from analytics.reports.service import ReportService, record_dict
from analytics.store.base import Resolution, SeriesPoint, Store, ZoneShape, choose_resolution
from civicmesh.metrics import BY_NAME, Quality

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ONLINE_WINDOWS = 3
CHART_METRICS = (
    "pm25",
    "pm10",
    "no2",
    "o3",
    "co",
    "temperature",
    "relativehumidity",
    "vehicle_count",
    "mean_speed",
    "occupancy",
)
# How people read each metric: its name, its unit and the decimals worth showing.
DISPLAY: dict[str, tuple[str, str, int]] = {
    "pm25": ("PM2.5", "µg/m³", 1),
    "pm10": ("PM10", "µg/m³", 1),
    "no2": ("NO₂", "µg/m³", 1),
    "o3": ("Ozone", "µg/m³", 1),
    "co": ("CO", "mg/m³", 2),
    "temperature": ("Temperature", "°C", 1),
    "relativehumidity": ("Relative humidity", "%", 0),
    "vehicle_count": ("Traffic volume", "vehicles per window", 0),
    "mean_speed": ("Traffic speed", "km/h", 0),
    "occupancy": ("Road occupancy", "%", 0),
}
# A trailing mean is drawn only where its window is mostly covered (75 %, the usual
# data-capture rule of air-quality reporting).
MIN_COVERAGE = 0.75
RANGES = {"24h": DAY_MS, "7d": 7 * DAY_MS, "30d": 30 * DAY_MS}
MAX_POINTS = 400
FAULT_FLAGS = int(
    Quality.OUT_OF_RANGE | Quality.STUCK | Quality.SPIKE | Quality.DRIFT | Quality.IMPLAUSIBLE
)


def zone_aqi(store: Store, now_ms: int) -> dict[str, aqi.IndexResult]:
    """Current US AQI per zone, by the one definition /ask uses too (facts.AQI_NOW: EPA
    NowCast of PM, the last 8 h's O3, the last hour's NO2)."""
    out: dict[str, aqi.IndexResult] = {}
    for zone in sorted(z.zone for z in store.zones()):
        result = current_aqi(store, zone, now_ms)
        if result is not None:
            out[zone] = result
    return out


def online(last_seen_ms: int | None, now_ms: int, window_s: int) -> bool:
    return last_seen_ms is not None and now_ms - last_seen_ms <= ONLINE_WINDOWS * window_s * 1000


def overview(
    store: Store, reports: ReportService, now_ms: int, window_s: int, shapes: list[ZoneShape]
) -> dict[str, Any]:
    indices = zone_aqi(store, now_ms)
    devices = store.devices()
    zones = store.zones()
    features = []
    by_zone = {s.zone: s for s in shapes}
    for zone in zones:
        shape = by_zone.get(zone.zone)
        result = indices.get(zone.zone)
        props = {
            "zone": zone.zone,
            "label": shape.label if shape else zone.zone,
            "devices": zone.devices,
            "aqi": result.value if result else None,
            "category": result.category if result else "No data",
            "color": result.color if result else "#9e9e9e",
            "dominant": LABELS.get(result.dominant.split("_")[0], result.dominant)
            if result
            else None,
        }
        geometry = json.loads(shape.geometry_json) if shape else None
        features.append({"type": "Feature", "properties": props, "geometry": geometry})
    day = store.zone_aggregates(now_ms - DAY_MS, now_ms)
    readings = sum(a.count for a in day if a.zone is None)
    device_rows = [
        {
            "device_id": d.device_id,
            "zone": d.zone,
            "lat": d.lat,
            "lon": d.lon,
            "kind": d.kind,
            "status": d.status,
            "online": online(d.last_seen_ms, now_ms, window_s),
            "last_seen": iso(d.last_seen_ms) if d.last_seen_ms else None,
        }
        for d in devices
    ]
    worst = max(indices.items(), key=lambda kv: kv[1].value, default=None)
    city = store.reports(scope="city", limit=1)
    return {
        "generated": iso(now_ms),
        "zones": {"type": "FeatureCollection", "features": features},
        "devices": device_rows,
        "headline": {
            "devices_total": len(devices),
            "devices_online": sum(1 for d in device_rows if d["online"]),
            "readings_24h": readings,
            "worst_zone": worst[0] if worst else None,
            "worst_aqi": worst[1].value if worst else None,
            "worst_category": worst[1].category if worst else None,
            "aqi_table": next(iter(indices.values())).table_version if indices else None,
        },
        "summary": record_dict(city[0]) if city else None,
    }


def metric_info() -> dict[str, dict[str, Any]]:
    """Every metric's display name, unit and decimals, for the pages to label values."""
    out = {}
    for m in BY_NAME.values():
        label, unit, digits = DISPLAY.get(m.name, (m.description, m.unit, 1))
        out[m.name] = {"label": label, "unit": unit, "digits": digits}
    return out


def guideline_of(metric: str) -> aqi.Guideline | None:
    """The WHO 2021 short-term guideline of ``metric`` (24 h; ozone 8 h), if any."""
    for g in aqi.WHO_2021:
        if g.metric == metric and g.averaging in ("24h", "8h"):
            return g
    return None


def trailing_means(
    hourly: list[SeriesPoint], start_ms: int, end_ms: int, hours: int
) -> list[dict[str, Any]]:
    """The count-weighted mean of the ``hours`` hourly buckets ending with each hour in
    ``[start_ms, end_ms)``: the running mean a WHO 24-h (or 8-h) guideline is set
    against. An hour whose window is covered less than ``MIN_COVERAGE`` gets no value."""
    by_hour = {p.bucket_ms: p for p in hourly if math.isfinite(p.mean) and p.count > 0}
    out = []
    first = start_ms - start_ms % HOUR_MS
    for t in range(first, end_ms, HOUR_MS):
        window = [
            by_hour[h] for h in range(t - (hours - 1) * HOUR_MS, t + 1, HOUR_MS) if h in by_hour
        ]
        if len(window) < MIN_COVERAGE * hours:
            continue
        total = sum(p.mean * p.count for p in window)
        n = sum(p.count for p in window)
        # stamped like the hourly points: the hour that ends the window
        out.append({"t": iso(t), "mean": round(total / n, 3)})
    return out


def chart_guides(
    store: Store, metric: str, zone: str, start_ms: int, end_ms: int, resolution: Resolution
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The guideline lines of a chart and the mean series they are to be read against.

    A 24-h guideline is compared with 24-h means, never with hourly ones: over hourly
    points the chart gets the trailing 24-h mean as its own line; daily points (the 1 d
    rollup, UTC days) are 24-h means already. Ozone's 8-h guideline gets the trailing
    8-h mean over hourly points and no line over daily means (a day's mean is not an
    8-h mean)."""
    g = guideline_of(metric)
    if g is None:
        return [], None
    hours = 24 if g.averaging == "24h" else 8
    name = f"WHO 2021 {hours}-h guideline"
    if resolution is Resolution.DAY:
        if hours != 24:
            return [], None
        return [{"label": name, "value": g.value, "averaging": g.averaging, "over": "points"}], None
    hourly = store.rollup_series(
        metric, start_ms - hours * HOUR_MS, end_ms, Resolution.HOUR, zone=zone
    )
    average = {
        "label": f"{hours}-h mean",
        "hours": hours,
        "points": trailing_means(hourly, start_ms, end_ms, hours),
    }
    guide = {"label": name, "value": g.value, "averaging": g.averaging, "over": "average"}
    return [guide], average


def zone_page(store: Store, zone: str, start_ms: int, end_ms: int) -> dict[str, Any]:
    resolution = choose_resolution(start_ms, end_ms, MAX_POINTS)
    info = metric_info()
    charts = []
    for metric in CHART_METRICS:
        points = store.rollup_series(metric, start_ms, end_ms, resolution, zone=zone)
        guides, average = chart_guides(store, metric, zone, start_ms, end_ms, resolution)
        charts.append(
            {
                "metric": metric,
                "label": info[metric]["label"],
                "unit": info[metric]["unit"],
                "digits": info[metric]["digits"],
                "resolution": resolution.label,
                "points": [
                    {"t": iso(p.bucket_ms), "mean": round(p.mean, 3), "min": p.min, "max": p.max}
                    for p in points
                    if math.isfinite(p.mean)
                ],
                "guides": guides,
                "average": average,
            }
        )
    reports = {}
    for kind in ("daily", "weekly"):
        stored = store.reports(scope=zone, kind=kind, limit=1)
        reports[kind] = record_dict(stored[0]) if stored else None
    return {
        "zone": zone,
        "start": iso(start_ms),
        "end": iso(end_ms),
        "resolution": resolution.label,
        "charts": charts,
        "reports": reports,
    }


def device_health(store: Store, now_ms: int, window_s: int) -> list[dict[str, Any]]:
    devices = store.devices()
    flagged = store.flagged_readings(now_ms - DAY_MS, now_ms, FAULT_FLAGS)
    reasons = store.quarantine_reasons(now_ms - DAY_MS, now_ms)
    models = store.model_versions()
    health = {h.device_id: h for h in store.device_health()}
    rows = []
    for d in devices:
        h = health.get(d.device_id)
        rows.append(
            {
                "device_id": d.device_id,
                "zone": d.zone,
                "kind": d.kind,
                "status": d.status,
                "online": online(d.last_seen_ms, now_ms, window_s),
                "last_seen": iso(d.last_seen_ms) if d.last_seen_ms else None,
                "last_seq": d.last_seq,
                "batches": d.batches,
                "model_version": models.get(d.device_id) or None,
                "flagged_24h": flagged.get(d.device_id, 0),
                "quarantined_24h": reasons.get(d.device_id, {}),
                "quarantined_total_24h": sum(reasons.get(d.device_id, {}).values()),
                "signature_or_chain_failures_24h": sum(
                    n
                    for r, n in reasons.get(d.device_id, {}).items()
                    if r.startswith(("signature", "chain", "envelope", "key"))
                ),
                "health": None
                if h is None
                else {
                    "reported": iso(h.reported_ms),
                    "outbox_batches": h.outbox_batches,
                    "outbox_readings": h.outbox_readings,
                    "agent_version": h.agent_version,
                    "gateway_id": h.gateway_id,
                },
            }
        )
    return rows


def window_of(
    range_: str, start: datetime | None, end: datetime | None, now_ms: int
) -> tuple[int, int]:
    if range_ == "custom":
        if start is None or end is None:
            raise ValueError("a custom range needs start and end")
        lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        if hi <= lo:
            raise ValueError("end must be after start")
        if hi - lo > 366 * DAY_MS:
            raise ValueError("a range of at most a year")
        return lo, hi
    if range_ not in RANGES:
        raise ValueError(f"unknown range {range_!r}; use 24h, 7d, 30d or custom")
    return now_ms - RANGES[range_], now_ms


__all__ = ["Resolution", "device_health", "metric_info", "overview", "zone_page"]
