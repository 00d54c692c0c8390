"""``/health``: the service's own state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from analytics.api.common import (
    RegistryDep,
    StatsDep,
    StoreDep,
    resource_router,
)
from civicmesh import __version__

router = resource_router()


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
