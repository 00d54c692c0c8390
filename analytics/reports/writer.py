"""Reports worth reading: what was notable in a period, for the city and each zone.

:func:`notable` finds the notable facts of a fact sheet by fixed rules: episodes and
exceedances (days above the WHO guideline, a US AQI day worse than Moderate, hours the
European AQI rates Poor), records in the store's history (the highest or lowest daily
mean since the data began), the biggest changes against the previous period, data
gaps, device faults and traffic anomalies (a day far off the period's usual traffic).
Each notable fact is a :class:`~analytics.reports.narrative.Topic`, so its numbers are
filled in by code and checked like every other text.

:func:`write_report` makes the text: a city paragraph (the model may order it and add
connecting words; it must keep every notable topic, or the deterministic writer's text
is used) and one deterministic paragraph per zone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import date, datetime
from zoneinfo import ZoneInfo

from analytics.reports.facts import (
    AIR_METRICS,
    DAY_MS,
    LABELS,
    Fact,
    FactSheet,
    daily_means,
)
from analytics.reports.narrative import Topic, _t, answer_topics, render_topic, topics_for
from analytics.store.base import Resolution, Store

HISTORY_DAYS = 365
MIN_HISTORY_DAYS = 14  # a "record" needs this much history before the period
BIG_CHANGE_PCT = 20.0
TRAFFIC_ANOMALY = 0.25  # a day this far from the period's mean daily traffic
ZONE_TOPICS = 4
CITY_TOPICS = 9
BAD_AQI = ("Unhealthy for Sensitive Groups", "Unhealthy", "Very Unhealthy", "Hazardous")


@dataclass(frozen=True, slots=True)
class Notable:
    topic: Topic
    kind: str  # episode, exceedance, record, change, gap, fault, traffic
    weight: float


def _value(sheet: FactSheet, fact_id: str) -> float:
    fact = sheet.get(fact_id)
    if fact is None or isinstance(fact.value, str):
        return 0.0
    return float(fact.value)


def notable(sheet: FactSheet, *, zone: bool = False) -> list[Notable]:
    """The notable facts of ``sheet`` (with ``add_history_facts`` applied), most
    important first. A zone's paragraph gets the short forms (the city's states the
    dates and records)."""
    topics = answer_topics(sheet)
    topics.update({t.id: t for t in history_topics(sheet) if all(n in sheet for n in t.needs)})
    found: list[Notable] = []

    def add(topic_id: str, kind: str, weight: float) -> bool:
        topic = topics.get(topic_id)
        if topic is None or any(n.topic.id == topic_id for n in found):
            return False
        found.append(Notable(topic, kind, weight))
        return True

    category = sheet.get("aqi.worst_day.category")
    if category is not None and str(category.value) in BAD_AQI:
        add("aqi.worst", "episode", 100)
    exceeded = [m for m in AIR_METRICS if _value(sheet, f"{m}.who_exceedance_days") > 0]
    for metric in exceeded[:2]:
        weight = 90 - AIR_METRICS.index(metric)
        if zone or not add(f"{metric}.who_dates", "exceedance", weight):
            add(f"{metric}.who", "exceedance", weight)
    if not exceeded:
        for metric in ("no2", "o3"):
            if _value(sheet, f"{metric}.eaqi_hours.poor_or_worse") > 0:
                add(f"{metric}.eaqi", "exceedance", 70)
    if not zone:
        records = [t for i, t in topics.items() if i.endswith(".record_high")]
        if records:
            found.append(Notable(records[0], "record", 75.0))
        add("traffic.anomaly", "traffic", 65)
    if _value(sheet, "devices.faulty") > 0:
        add("data.faulty_list", "fault", 85)
    if _value(sheet, "devices.gaps") > 0:
        add("data.gap_devices", "gap", 80)
    changes = sorted(
        (m for m in sheet.metrics if _value(sheet, f"{m}.change_pct") >= BIG_CHANGE_PCT),
        key=lambda m: -_value(sheet, f"{m}.change_pct"),
    )
    for metric in changes[: 1 if zone else 2]:
        add("traffic.change" if metric == "vehicle_count" else f"{metric}.level", "change", 60)
    return sorted(found, key=lambda n: -n.weight)


def _record_topics(sheet: FactSheet, topics: dict[str, Topic]) -> list[tuple[str, str, float]]:
    return [(f.id, "record", 75.0) for f in sheet.facts if f.id.endswith(".record_high")]


# --------------------------------------------------------------- history facts


def add_history_facts(sheet: FactSheet, store: Store) -> FactSheet:
    """``sheet`` with record and traffic-anomaly facts (and their topics' templates)
    computed from the store's daily rollups."""
    extra: list[Fact] = []
    first = sheet.local(sheet.start_ms)
    for metric in sheet.metrics:
        extra += _records(sheet, store, metric, first)
    extra += _traffic_anomaly(sheet, store)
    if not extra:
        return sheet
    return replace(sheet, facts=sheet.facts + tuple(extra))


def _records(sheet: FactSheet, store: Store, metric: str, first: datetime) -> list[Fact]:
    points = store.rollup_series(
        metric,
        sheet.start_ms - HISTORY_DAYS * DAY_MS,
        sheet.end_ms,
        Resolution.HOUR,
        zone=sheet.zone,
    )
    days = daily_means(points, ZoneInfo(sheet.timezone))
    start_day = first.date().isoformat()
    before = {d: v for d, v in days.items() if d < start_day}
    inside = {d: v for d, v in days.items() if d >= start_day}
    if len(before) < MIN_HISTORY_DAYS or not inside:
        return []
    out = []
    label = LABELS[metric]
    unit = "vehicles per window" if metric == "vehicle_count" else _unit(metric)
    decimals = 2 if metric == "co" else 1
    since = datetime.fromisoformat(min(before)).strftime("%d %b %Y")
    high_day = max(inside, key=lambda d: inside[d])
    if inside[high_day] > max(before.values()):
        out += _record_facts(
            sheet,
            f"{metric}.record_high",
            inside[high_day],
            unit,
            decimals,
            f"highest daily mean {label} since {since}",
            high_day,
            since,
        )
    return out


def _unit(metric: str) -> str:
    from civicmesh.metrics import BY_NAME

    return BY_NAME[metric].unit


def _record_facts(
    sheet: FactSheet,
    fact_id: str,
    value: float,
    unit: str,
    decimals: int,
    label: str,
    day: str,
    since: str,
) -> list[Fact]:
    source = "rollup_zone_1h (history)"
    when = datetime.fromisoformat(day).strftime("%a %d %b")
    return [
        Fact(fact_id, value, unit, label, sheet.start_ms, sheet.end_ms, source, decimals),
        Fact(
            f"{fact_id}.date",
            when,
            "date",
            f"day of the {label}",
            sheet.start_ms,
            sheet.end_ms,
            source,
        ),
        Fact(
            f"{fact_id}.since",
            since,
            "date",
            "start of the store's history",
            sheet.start_ms,
            sheet.end_ms,
            source,
        ),
    ]


def _daily_traffic(sheet: FactSheet, store: Store, lo: int, hi: int) -> dict[str, float]:
    points = store.rollup_series("vehicle_count", lo, hi, Resolution.HOUR, zone=sheet.zone)
    totals: dict[str, float] = defaultdict(float)
    hours: dict[str, int] = defaultdict(int)
    for p in points:
        day = sheet.local(p.bucket_ms).date().isoformat()
        totals[day] += p.mean * p.count
        hours[day] += 1
    return {d: v for d, v in totals.items() if hours[d] >= 20}


def _traffic_anomaly(sheet: FactSheet, store: Store) -> list[Fact]:
    """The day of the period whose traffic was furthest from the same weekday's mean
    over the 4 weeks before, when it was at least TRAFFIC_ANOMALY off."""
    if "vehicle_count" not in sheet.metrics:
        return []
    days = _daily_traffic(sheet, store, sheet.start_ms - 28 * DAY_MS, sheet.end_ms)
    first = sheet.local(sheet.start_ms).date().isoformat()
    best: tuple[float, str] | None = None
    for day, total in days.items():
        if day < first:
            continue
        weekday = date.fromisoformat(day).weekday()
        same = [
            v for d, v in days.items() if d < first and date.fromisoformat(d).weekday() == weekday
        ]
        if len(same) < 2:
            continue
        usual = sum(same) / len(same)
        off = (total - usual) / usual if usual else 0.0
        if abs(off) >= TRAFFIC_ANOMALY and (best is None or abs(off) > abs(best[0])):
            best = (off, day)
    if best is None:
        return []
    off, day = best
    source = "rollup_zone_1h"
    when = datetime.fromisoformat(day).strftime("%a %d %b")
    span = (sheet.start_ms, sheet.end_ms)
    return [
        Fact("traffic.anomaly.date", when, "date", "day of unusual traffic", *span, source),
        Fact(
            "traffic.anomaly.pct",
            abs(off) * 100,
            "%",
            "how far that day's traffic was from the same weekday's mean of the 4 weeks before",
            *span,
            source,
        ),
        Fact(
            "traffic.anomaly.direction",
            "above" if off > 0 else "below",
            "direction",
            "above or below",
            *span,
            source,
        ),
    ]


def history_topics(sheet: FactSheet) -> list[Topic]:
    """Templates of the facts :func:`add_history_facts` adds."""
    out = []
    for fact in sheet.facts:
        if fact.id.endswith(".record_high"):
            metric = fact.id.split(".")[0]
            out.append(
                _t(
                    fact.id,
                    f"a record {LABELS[metric]} day",
                    f"{{{fact.id}.date}} had the highest daily mean {LABELS[metric]} since "
                    f"{{{fact.id}.since}}: {{{fact.id}}}.",
                )
            )
    if sheet.get("traffic.anomaly.date") is not None:
        out.append(
            _t(
                "traffic.anomaly",
                "a day of unusual traffic",
                "Traffic on {traffic.anomaly.date} was {traffic.anomaly.pct} "
                "{traffic.anomaly.direction} the usual for that weekday.",
            )
        )
    return out


# ------------------------------------------------------------------- writing

WORD_BUDGET = 290  # a week's report: 120-300 words
CITY_WORDS = 110  # the city paragraph tells usual topics until it has this many words
ZONE_USUAL = 2  # usual topics per zone paragraph, after its notable ones


def words(text: str) -> int:
    return len(text.split())


def city_topics(sheet: FactSheet) -> tuple[list[Topic], list[Topic]]:
    """(the notable topics, the usual ones that fill the city paragraph)."""
    found = [n.topic for n in notable(sheet)]
    usual: list[Topic] = []
    told = sum(words(render_topic(t, sheet)) for t in found)
    ids = {t.id for t in found}
    for topic in topics_for(sheet):
        if topic in found or f"{topic.id}_dates" in ids or told >= CITY_WORDS:
            continue
        usual.append(topic)
        told += words(render_topic(topic, sheet))
    return found, usual


def zone_paragraph(name: str, sheet: FactSheet, budget: int) -> tuple[str, list[str]]:
    """The zone's paragraph within ``budget`` words (notable topics first) and the
    topic ids it tells."""
    found = [n.topic for n in notable(sheet, zone=True)]
    usual = [t for t in topics_for(sheet) if t not in found][: max(ZONE_USUAL - len(found), 1)]
    sentences: list[str] = []
    told: list[str] = []
    used = words(name) + 1
    for topic in found + usual:
        sentence = render_topic(topic, sheet)
        if used + words(sentence) > budget and topic not in found:
            continue
        sentences.append(sentence)
        told.append(topic.id)
        used += words(sentence)
    if not sentences:
        return f"{name}: no data in this period.", told
    return f"{name}: " + " ".join(sentences), told
