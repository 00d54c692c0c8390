"""``GET /api/v1/alerts``: open alerts and those resolved lately, with their evidence."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException, Query, Request
from pydantic import BaseModel, Field

from analytics.alerts.engine import alert_json
from analytics.alerts.state import AlertLog, AlertStateError
from analytics.api.common import resource_router
from analytics.apiauth import requires
from civicmesh.timeutil import now_ms

router = resource_router()
HOUR_MS = 3_600_000


class AlertsOut(BaseModel):
    configured: bool = Field(description="Alert rules are configured (alerts.rules)")
    generated: datetime
    open: list[dict[str, Any]] = Field(description="Open alerts, oldest first")
    recent: list[dict[str, Any]] = Field(description="Alerts resolved lately, newest first")
    deliveries: dict[str, int] = Field(description="Queued, delivered and abandoned events")


@router.get(
    "/alerts",
    response_model=AlertsOut,
    summary="Open and recently resolved alerts, with the evidence behind each",
    tags=["alerts"],
    dependencies=[requires("operator")],
)
def alerts(
    request: Request,
    recent_hours: Annotated[
        int, Query(ge=0, le=24 * 90, description="Resolved alerts of the last hours")
    ] = 24 * 7,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many resolved")] = 100,
    deliveries: Annotated[
        bool, Query(description="List each alert's delivery attempts too")
    ] = False,
) -> AlertsOut:
    """Each alert has its rule, severity, subject (``zone:...`` or ``device:...``), when
    its condition began, when it opened and resolved, the numbers that made it fire
    (``evidence``; on resolve also ``evidence.at_resolve``), the time range they were
    computed over and a link to the zone on the dashboard."""
    path: Path | None = getattr(request.app.state, "alerts_state_file", None)
    generated = datetime.now(UTC)
    empty = {"pending": 0, "delivered": 0, "gave_up": 0}
    if path is None or not path.exists():
        return AlertsOut(
            configured=path is not None, generated=generated, open=[], recent=[],
            deliveries=empty,
        )  # fmt: skip
    try:
        log = AlertLog(path, readonly=True)
    except AlertStateError:
        raise HTTPException(503, "The alert state is unavailable; try again shortly") from None
    try:
        opened = log.open_alerts()
        recent = log.recent(now_ms() - recent_hours * HOUR_MS, limit)
        counts = log.delivery_counts()
        public_url = getattr(request.app.state, "alerts_public_url", "")

        def out(alert: Any) -> dict[str, Any]:
            item = alert_json(alert, public_url)
            if deliveries:
                item["deliveries"] = log.deliveries_of(alert.id)
            return item

        return AlertsOut(
            configured=True,
            generated=generated,
            open=[out(a) for a in opened],
            recent=[out(a) for a in recent],
            deliveries={
                "pending": counts.pending, "delivered": counts.delivered,
                "gave_up": counts.gave_up,
            },
        )  # fmt: skip
    except AlertStateError:
        raise HTTPException(503, "The alert state is unavailable; try again shortly") from None
    finally:
        log.close()
