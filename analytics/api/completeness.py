"""``/completeness``: how much of what devices should have sent arrived."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field

from analytics.api.common import (
    DEFAULT_WINDOW_S,
    ErrorOut,
    StoreDep,
    iso,
    require_zone,
    resource_router,
    time_window,
)

router = resource_router()


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
    start_ms, end_ms = time_window(start, end)
    if zone is not None:
        require_zone(store, zone)
    rows = store.completeness(start_ms, end_ms, interval, zone=zone)
    zones: dict[str, list[int]] = {}
    for c in rows:
        totals = zones.setdefault(c.zone, [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += c.metrics > 0
        totals[2] += c.expected
        totals[3] += c.received
    return CompletenessOut(
        start=iso(start_ms),
        end=iso(end_ms),
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
