"""``GET /api/v1/accounting/scores?day=YYYY-MM-DD``: the day's scores and explanations."""

from __future__ import annotations

import hashlib
import threading
from typing import Annotated

from fastapi import HTTPException, Query
from pydantic import BaseModel, Field

from analytics.accounting.cli import scores_for_day
from analytics.accounting.load import parse_day
from analytics.accounting.rules import AccountingRule
from analytics.api.common import ErrorOut, RegistryDep, StoreDep, resource_router

router = resource_router()
CACHE_SIZE = 8
_CACHE: dict[tuple[object, ...], DayScoresOut] = {}
_CACHE_LOCK = threading.Lock()


class LossOut(BaseModel):
    check: str = Field(
        description="offline, missing, range, stuck, jump, flagged, neighbours, clock or duplicate"
    )
    metric: str = Field(description='The metric, or "*" for the whole device')
    points: float = Field(description="Points of the daily score (0..1) lost")
    intervals: list[list[int]] = Field(description="[start, end) epoch ms where it happened")
    detail: str


class DeviceScoreOut(BaseModel):
    device_id: str
    owner: str
    score: float = Field(description="Mean of the 24 hourly scores, 0..1")
    hourly: list[float]
    cell: str | None = Field(description="H3 cell of the declared location")
    rewarded: bool
    not_rewarded_because: str
    explanations: list[str] = Field(description='Every point lost, e.g. "pm25 stuck 03:00-07:10"')
    losses: list[LossOut]


class DayScoresOut(BaseModel):
    day: str
    rule: str = Field(description="Rule version and digest of every parameter")
    devices: list[DeviceScoreOut]


@router.get(
    "/accounting/scores",
    response_model=DayScoresOut,
    summary="Data-quality scores of every device for one UTC day",
    tags=["accounting"],
    responses={422: {"model": ErrorOut, "description": "Invalid day"}},
)
def scores(
    store: StoreDep,
    registry: RegistryDep,
    day: Annotated[str, Query(min_length=1, max_length=32, description="UTC day, YYYY-MM-DD")],
) -> DayScoresOut:
    """Scores recomputed from the stored readings, ledger and registry (docs/accounting.md)."""
    try:
        parse_day(day)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    snapshot = registry.current() if registry else None
    counts = store.counts()
    # A city-day takes seconds to score: the answer is kept while nothing it rests on
    # changed (no batch written, the same registry, the same rule).
    key = (
        id(store),
        day.strip(),
        AccountingRule().rule_id(),
        counts.batches,
        counts.readings,
        hashlib.sha256(snapshot.to_json().encode()).hexdigest() if snapshot else "",
    )
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is None:
        cached = DayScoresOut.model_validate(scores_for_day(store, snapshot, day).to_dict())
        with _CACHE_LOCK:
            _CACHE[key] = cached
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
    return cached
