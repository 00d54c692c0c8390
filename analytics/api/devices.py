"""``/devices``: registered devices and whether they are online."""

from __future__ import annotations

from datetime import datetime

from fastapi import Request
from pydantic import BaseModel, Field

from analytics.api.common import (
    ONLINE_WINDOWS,
    StoreDep,
    iso,
    resource_router,
)
from civicmesh.timeutil import now_ms

router = resource_router()


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
            last_seen=None if d.last_seen_ms is None else iso(d.last_seen_ms),
            last_seen_ms=d.last_seen_ms,
            last_seq=d.last_seq,
            batches=d.batches,
            online=d.last_seen_ms is not None and d.last_seen_ms >= online_after,
        )
        for d in store.devices()
    ]
