"""``/zones``: the city's zones."""

from __future__ import annotations

from pydantic import BaseModel, Field

from analytics.api.common import (
    StoreDep,
    resource_router,
)

router = resource_router()


class ZoneOut(BaseModel):
    zone: str
    devices: int = Field(description="Registered devices in the zone")
    lat: float | None = Field(description="Mean latitude of its devices")
    lon: float | None = Field(description="Mean longitude of its devices")


@router.get("/zones", response_model=list[ZoneOut], summary="Zones", tags=["devices"])
def zones(store: StoreDep) -> list[ZoneOut]:
    """Zones with their device count and mean position."""
    return [ZoneOut(zone=z.zone, devices=z.devices, lat=z.lat, lon=z.lon) for z in store.zones()]
