"""``/latest``, ``/series`` and ``/aggregates``: the readings themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import HTTPException, Query
from pydantic import BaseModel, Field

from analytics.api.common import (
    KNOWN_METRICS,
    MAX_BUCKET_S,
    MAX_SERIES_POINTS,
    MIN_BUCKET_S,
    ErrorOut,
    StoreDep,
    iso,
    require_device,
    require_zone,
    resource_router,
    time_window,
)
from analytics.store.base import Resolution, choose_resolution
from civicmesh.metrics import BY_NAME

router = resource_router()


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
        require_zone(store, zone)
    return [
        LatestOut(
            device_id=r.device_id,
            zone=r.zone,
            metric=r.metric,
            unit=BY_NAME[r.metric].unit,
            time=iso(r.ts_ms),
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
    start_ms, end_ms = time_window(start, end)
    if bucket is not None:
        buckets = (end_ms - start_ms) // (bucket * 1000)
        if buckets > MAX_SERIES_POINTS:
            raise HTTPException(
                422,
                f"The range holds {buckets} buckets of {bucket} s; the limit is "
                f"{MAX_SERIES_POINTS}: choose a larger bucket or a shorter range",
            )
    if zone is not None:
        require_zone(store, zone)
    if device is not None:
        require_device(store, device)
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
        start=iso(start_ms),
        end=iso(end_ms),
        bucket_s=bucket if bucket is not None else chosen.seconds,
        resolution=chosen.label,
        points=[
            SeriesPointOut(
                start=iso(p.bucket_ms),
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
    start_ms, end_ms = time_window(start, end)
    chosen = Resolution.parse(resolution)
    return AggregatesOut(
        start=iso(start_ms),
        end=iso(end_ms),
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
