"""HTTP routes of the report service: ``/ask``, ``/reports`` and ``/facts``.

Plain ``def`` endpoints: FastAPI runs them in its thread pool, where the store and the
model (which serializes its own generations) belong.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from analytics.apiauth import requires
from analytics.reports.facts import REPORT_METRICS, FactSheetError, build_fact_sheet
from analytics.reports.intent import CITY, IntentError
from analytics.reports.service import (
    ReportService,
    generate_due,
    record_dict,
    to_record,
)

router = APIRouter(prefix="/api/v1", tags=["reports"], dependencies=[requires("viewer")])


def get_service(request: Request) -> ReportService:
    service = getattr(request.app.state, "reports", None)
    if service is None:
        raise HTTPException(503, "The report service is not configured on this server")
    return service  # type: ignore[no-any-return]


ServiceDep = Annotated[ReportService, Depends(get_service)]


class AskIn(BaseModel):
    question: str = Field(min_length=1, max_length=500, description="A question in plain words")
    now: datetime | None = Field(
        default=None,
        description="Answer as if asked at this time (ISO 8601 with offset); default: now",
    )


class FactOut(BaseModel):
    id: str
    value: float | int | str
    unit: str
    text: str = Field(description="The value as the answer's text shows it")
    label: str
    start: str = Field(description="Start of the query window the value came from (UTC)")
    end: str
    source: str = Field(description="The table or query it came from")
    scope: str | None = None


class NarrativeOut(BaseModel):
    source: str = Field(description='"llm", or "deterministic" (fixed templates)')
    model: str | None
    prompt_version: str
    fallback_reason: str | None = Field(
        description="Why the deterministic text was returned, when it was"
    )


class AskOut(BaseModel):
    question: str
    intent: dict[str, Any] = Field(description="kind, metrics, places, periods, parser")
    text: str = Field(description="The answer; every number in it is one of the facts")
    narrative: NarrativeOut
    facts: list[FactOut] = Field(description="The facts the text states")
    table: dict[str, Any] = Field(description="columns and rows")
    chart: dict[str, Any] = Field(description="A Vega-Lite v5 specification with its data")
    ledger: list[dict[str, Any]] = Field(
        description="Per scope: the verified batches (chain heads) the facts rest on"
    )
    notes: list[str]
    seconds: float


class AskErrorOut(BaseModel):
    error: str = Field(description="unknown_place, unknown_metric, out_of_scope or refused")
    message: str
    suggestions: list[str] = Field(description="Closest known places or metrics")


class ReportOut(BaseModel):
    id: int | None
    scope: str
    kind: str
    period_start: str
    period_end: str
    created_ms: int
    text: str
    narrative: dict[str, Any]
    facts: list[dict[str, Any]]
    ledger: dict[str, Any] = Field(description="batches, devices, digest and chain heads")


class ReportIn(BaseModel):
    kind: str = Field(pattern="^(daily|weekly)$", description="daily or weekly")
    zone: str | None = Field(default=None, description="A zone; absent: the whole city")
    end: datetime | None = Field(
        default=None, description="The report covers the whole day or week before this"
    )


@router.post(
    "/ask",
    response_model=AskOut,
    responses={422: {"model": AskErrorOut, "description": "The question cannot be answered"}},
    summary="Answer a question about air quality or traffic",
)
def ask(body: AskIn, service: ServiceDep) -> Any:
    """Question -> intent (metrics, places, period, comparison) -> fact sheets -> answer.

    An unknown place or metric gets a 422 naming the closest known ones; questions outside
    air quality and traffic, forecasts and instructions to the system are refused.
    """
    try:
        answer = service.ask(body.question, body.now)
    except IntentError as exc:
        raise HTTPException(
            422,
            {"error": exc.code, "message": str(exc), "suggestions": list(exc.suggestions)},
        ) from None
    except FactSheetError as exc:
        raise HTTPException(
            422, {"error": "invalid", "message": str(exc), "suggestions": []}
        ) from None
    return answer.to_dict()


@router.get("/reports", response_model=list[ReportOut], summary="Stored reports")
def list_reports(
    service: ServiceDep,
    scope: Annotated[str | None, Query(description="A zone, or city")] = None,
    kind: Annotated[str | None, Query(pattern="^(daily|weekly)$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> Any:
    """Reports, newest period first, each with its facts, model and ledger span."""
    return [record_dict(r) for r in service.store.reports(scope=scope, kind=kind, limit=limit)]


@router.post(
    "/reports",
    response_model=ReportOut,
    summary="Write a report now",
    dependencies=[requires("operator")],
)
def create_report(body: ReportIn, service: ServiceDep) -> Any:
    """Write (or rewrite) the daily or weekly report of a zone or the city, and store it."""
    zone = None if body.zone in (None, CITY) else body.zone
    if zone is not None and zone not in service.zones():
        raise HTTPException(
            422, {"error": "unknown_place", "message": f"Unknown zone {zone!r}", "suggestions": []}
        )
    record = to_record(service.report(body.kind, zone, body.end))
    record_id = service.store.save_report(record)
    stored = service.store.reports(scope=record.scope, kind=record.kind, limit=50)
    for item in stored:
        if item.id == record_id:
            return record_dict(item)
    raise HTTPException(500, "The report was stored but cannot be read back")


@router.post(
    "/reports/due",
    response_model=list[ReportOut],
    summary="Write due reports",
    dependencies=[requires("operator")],
)
def due_reports(service: ServiceDep) -> Any:
    """What the schedule does: yesterday's and last week's reports not yet stored."""
    return [record_dict(r) for r in generate_due(service)]


@router.get("/facts", summary="The fact sheet of a zone or the city over a period")
def facts(
    service: ServiceDep,
    start: Annotated[datetime, Query(description="Period start (ISO 8601)")],
    end: Annotated[datetime, Query(description="Period end (ISO 8601)")],
    zone: Annotated[str | None, Query(description="A zone; absent: the city")] = None,
    metrics: Annotated[str | None, Query(description="Comma-separated; default all")] = None,
) -> Any:
    """Every fact with its value, unit and query window, plus the ledger span."""
    wanted = tuple(m.strip() for m in metrics.split(",")) if metrics else REPORT_METRICS
    if zone is not None and zone not in service.zones():
        raise HTTPException(422, f"Unknown zone {zone!r}")
    try:
        sheet = build_fact_sheet(
            service.store,
            int(start.timestamp() * 1000),
            int(end.timestamp() * 1000),
            zone=zone,
            timezone=service.timezone,
            metrics=wanted,
            window_s=service.window_s,
        )
    except FactSheetError as exc:
        raise HTTPException(422, str(exc)) from None
    return sheet.to_dict()
