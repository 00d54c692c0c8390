"""``/export.csv``: bulk CSV of readings or rollups, streamed (see :mod:`analytics.export`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import HTTPException, Query
from fastapi.responses import StreamingResponse

from analytics.api.common import KNOWN_METRICS, ErrorOut, StoreDep, resource_router, time_window
from analytics.export import ExportError, ExportRequest, csv_chunks, select_devices
from analytics.store.base import Resolution

router = resource_router()


@router.get(
    "/export.csv",
    summary="Bulk CSV export",
    tags=["export"],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/csv": {}}, "description": "CSV, streamed"},
        404: {"model": ErrorOut, "description": "Unknown device or zone"},
        422: {"description": "Unknown metric or bad range"},
    },
)
def export_csv(
    store: StoreDep,
    start: Annotated[
        datetime | None, Query(description="Range start, ISO 8601 (default: end - 24 h)")
    ] = None,
    end: Annotated[
        datetime | None, Query(description="Range end, exclusive (default: now)")
    ] = None,
    device: Annotated[
        str | None, Query(min_length=1, max_length=64, description="Only this device")
    ] = None,
    zone: Annotated[
        str | None, Query(min_length=1, max_length=128, description="Only this zone")
    ] = None,
    resolution: Annotated[
        str, Query(pattern="^(raw|1m|1h|1d)$", description="raw readings, or a rollup")
    ] = "raw",
    metric: Annotated[
        list[str] | None, Query(max_length=16, description=f"Only these (repeat): {KNOWN_METRICS}")
    ] = None,
) -> StreamingResponse:
    """Readings (``raw``: time, value, quality flags, provenance) or rollup buckets
    (count, mean, min, max) of a device, a zone or the whole city over ``[start, end)``,
    streamed as they are read: any range, in flat memory."""
    start_ms, end_ms = time_window(start, end)
    try:
        request = ExportRequest(
            start_ms=start_ms,
            end_ms=end_ms,
            resolution=Resolution.parse(resolution),
            device=device,
            zone=zone,
            metrics=tuple(metric or ()),
        )
    except ExportError as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        select_devices(store, request)  # before the first byte: errors keep their status
    except ExportError as exc:
        raise HTTPException(404, str(exc)) from None
    return StreamingResponse(
        csv_chunks(store, request),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{request.filename()}"'},
    )
