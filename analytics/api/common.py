"""What every resource router of the API shares: the prefix, the store and registry as
dependencies, the error model and the time and name helpers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from analytics.apiauth import requires
from analytics.store.base import Store
from civicmesh.metrics import METRICS
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
NAMES_SHOWN = 20

StatsProvider = Callable[[], dict[str, Any]]


class ErrorOut(BaseModel):
    detail: str


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_registry(request: Request) -> RegistryFile | None:
    registry: RegistryFile | None = request.app.state.registry
    return registry


def get_stats_provider(request: Request) -> StatsProvider | None:
    provider: StatsProvider | None = request.app.state.stats_provider
    return provider


def iso(ms: int) -> datetime:
    return ms_to_datetime(ms)


def utc_ms(value: datetime) -> int:
    # A time without offset is taken as UTC, the only zone the wire knows.
    return datetime_to_ms(value if value.tzinfo else value.replace(tzinfo=UTC))


def name_list(values: list[str]) -> str:
    shown = ", ".join(sorted(values)[:NAMES_SHOWN])
    more = len(values) - NAMES_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown or "(none)"


def require_zone(store: Store, zone: str) -> None:
    known = [z.zone for z in store.zones()]
    if zone not in known:
        raise HTTPException(404, f"Unknown zone {zone!r}; known zones: {name_list(known)}")


def require_device(store: Store, device_id: str) -> None:
    known = [d.device_id for d in store.devices()]
    if device_id not in known:
        raise HTTPException(404, f"Unknown device {device_id!r}; known devices: {name_list(known)}")


def time_window(start: datetime | None, end: datetime | None) -> tuple[int, int]:
    end_ms = now_ms() if end is None else utc_ms(end)
    span_ms = int(DEFAULT_SERIES_SPAN.total_seconds() * 1000)
    start_ms = end_ms - span_ms if start is None else utc_ms(start)
    if start_ms >= end_ms:
        raise HTTPException(422, "start must be before end")
    return start_ms, end_ms


StoreDep = Annotated[Store, Depends(get_store)]
RegistryDep = Annotated[RegistryFile | None, Depends(get_registry)]
StatsDep = Annotated[StatsProvider | None, Depends(get_stats_provider)]

ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "The store is unavailable"},
}


def resource_router() -> APIRouter:
    """A router under ``/api/v1`` whose every route needs a viewer token at least (when
    tokens are configured); routes that show raw payloads or metrics ask for more."""
    return APIRouter(prefix=PREFIX, responses=ERRORS, dependencies=[requires("viewer")])
