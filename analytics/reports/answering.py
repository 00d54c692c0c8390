"""What an answer must state, given what was asked: the topics of the asked quantity.

Each quantity names the topics that state it (:data:`QUANTITY_TOPICS`), per asked
metric or once; the first of a metric's candidates that the fact sheet can fill is told.
When none can be, the answer says so in words (no data), never something else instead.
"""

from __future__ import annotations

from analytics.reports.facts import AIR_METRICS, LABELS, TRAFFIC_METRICS, FactSheet
from analytics.reports.intent import Intent
from analytics.reports.narrative import Topic

# {m} is each asked metric; a tuple is a list of candidates, the first available told.
PER_METRIC: dict[str, tuple[str, ...]] = {
    "mean": ("{m}.level",),
    "peak": ("{m}.peak",),
    "exceedance_hours": ("{m}.who_hours",),
    "exceedance_days": ("{m}.who", "{m}.who_hours"),
}
ONCE: dict[str, tuple[str, ...]] = {
    "busiest_hour": ("traffic.busiest", "traffic.busiest_hour_of_day"),
    "total": ("traffic.total",),
    "device_health": ("data.devices", "data.faulty_list", "data.gaps_list"),
    "completeness": ("data.completeness", "data.coverage", "data.gaps_list"),
}
# a partial period is always said ("data for 4 of 24 hours") below this share
PARTIAL = 0.9


def pairs(intent: Intent) -> tuple[tuple[str, str], ...]:
    """The metric pairs a correlation question asks about (traffic side first)."""
    traffic = [m for m in intent.metrics if m in (*TRAFFIC_METRICS, "occupancy")]
    others = [m for m in intent.metrics if m not in traffic]
    if traffic and others:
        return tuple((t, o) for t in traffic[:1] for o in others[:3])
    ordered = list(intent.metrics)
    return tuple((ordered[0], b) for b in ordered[1:4])


def asked_topics(
    intent: Intent, by_id: dict[str, Topic], now: bool, sheet: FactSheet
) -> tuple[list[Topic], list[str]]:
    """The topics that state what ``intent`` asks, and sentences for what has no data."""
    required: list[Topic] = []
    missing: list[str] = []
    quantity = intent.quantity
    if quantity in PER_METRIC:
        for metric in intent.metrics:
            ids = [c.format(m=metric) for c in PER_METRIC[quantity]]
            found = next((by_id[i] for i in ids if i in by_id), None)
            if found is None:
                missing.append(f"No {LABELS[metric]} data to answer this for the period asked.")
            elif found not in required:
                required.append(found)
    elif quantity in ONCE:
        required += [by_id[i] for i in ONCE[quantity] if i in by_id]
        if not required:
            missing.append("There is no data to answer this for the period asked.")
    elif quantity == "aqi":
        key = "aqi.now" if now and "aqi.now" in by_id else "aqi.days_rated"
        if key in by_id:
            required.append(by_id[key])
        else:
            missing.append(
                "The US AQI needs a day with at least 18 hours of data (or, now, 2 of the "
                "last 3 hours); there is not enough data for the period asked."
            )
    elif quantity == "correlation":
        corr = [t for i, t in by_id.items() if i.startswith("corr.")]
        required += corr
        if not corr:
            missing.append(
                "There are too few hours with both measurements (12 needed) to correlate them."
            )
    else:
        required += _summary_topics(intent, by_id)
    coverage = by_id.get("data.coverage")
    if coverage is not None and coverage not in required and partial(sheet):
        required.append(coverage)
    return required, missing


def _summary_topics(intent: Intent, by_id: dict[str, Topic]) -> list[Topic]:
    """A broad question: each asked metric's level (its mean) leads."""
    out = []
    for metric in intent.metrics:
        topic = by_id.get(f"{metric}.level")
        if topic is None and metric in TRAFFIC_METRICS:
            topic = by_id.get("traffic.volume" if metric == "vehicle_count" else "traffic.speed")
        if topic is not None and topic not in out:
            out.append(topic)
    if set(intent.metrics) >= set(AIR_METRICS) and "aqi.days_rated" in by_id:
        out.append(by_id["aqi.days_rated"])
    return out[:6]


def partial(sheet: FactSheet) -> bool:
    """True when fewer than PARTIAL of the period's hours hold data."""
    got, expected = sheet.get("coverage.hours"), sheet.get("coverage.hours_expected")
    if got is None or expected is None or not isinstance(expected.value, int):
        return False
    return float(got.value) < PARTIAL * expected.value


def taken_as(intent: Intent) -> list[str]:
    """Sentences that say what the question was read as, where it left something open."""
    return [f"({note[0].upper()}{note[1:]}.)" for note in intent.notes]
