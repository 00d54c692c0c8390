"""Rule evaluation: what each rule sees in the store at ``now``, as findings.

A finding is one subject (a zone or a device) that a rule could judge, with whether its
condition holds and the numbers behind that. Subjects a rule cannot judge (a zone without
data) give no finding: their open alerts stay as they are. The engine turns findings into
alerts; this module only reads the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from analytics import aqi
from analytics.alerts.config import (
    AlertRule,
    AqiCategoryRule,
    CompletenessRule,
    DeviceOfflineRule,
    FaultFlagsRule,
    QuarantineBurstRule,
    WhoExceedanceRule,
)
from analytics.reports.facts import FAULT_FLAGS, MIN_8H_HOURS, nowcast
from analytics.store.base import Resolution, SeriesPoint, Store
from civicmesh.registry import IMPORT_KIND

MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS
NOWCAST_HOURS = 12
LOOKBACK_HOURS = 24
AQI_METRICS = ("pm25", "pm10", "o3", "no2")
CATEGORY_RANK = {name: i for i, (name, _) in enumerate(aqi.EPA_CATEGORIES)}


@dataclass(frozen=True, slots=True)
class Finding:
    """What one rule saw for one subject at one evaluation."""

    subject: str  # "zone:<name>" or "device:<id>"
    fires: bool  # the condition holds (for its minimum duration): open an alert
    holds: bool  # the condition holds at all: keep an open alert open
    since_ms: int  # when the condition began (or the start of the window looked at)
    start_ms: int  # the time range the evidence was computed over
    end_ms: int
    summary: str  # one line for a person
    evidence: dict[str, Any] = field(default_factory=dict)
    link: str = ""


def zone_link(zone: str) -> str:
    return f"/dashboard/#/zone/{quote(zone, safe='')}"


def _hour_floor(ms: int) -> int:
    return ms - ms % HOUR_MS


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _zones(store: Store, wanted: Sequence[str]) -> list[str]:
    known = sorted(z.zone for z in store.zones())
    return [z for z in known if z in wanted] if wanted else known


def hourly_aqi(store: Store, zone: str, now_ms: int, hours: int) -> list[tuple[int, int, str]]:
    """(hour start, US AQI, category) of the zone for the last ``hours`` hours up to and
    including the current one, each as of the end of that hour (NowCast over the 12
    hourly means before it, the current hour partial) - the same AQI the dashboard shows
    now (analytics.reports.facts.current_aqi). Hours the tables cannot rate are left out."""
    current = _hour_floor(now_ms)
    first = current - (hours - 1) * HOUR_MS
    means = {
        m: {
            p.bucket_ms: p.mean
            for p in store.rollup_series(
                m, first - NOWCAST_HOURS * HOUR_MS, current + HOUR_MS, Resolution.HOUR, zone=zone
            )
        }
        for m in AQI_METRICS
    }
    table = aqi.epa_table_for(datetime.fromtimestamp(now_ms / 1000, UTC))
    out = []
    for hour in range(first, current + HOUR_MS, HOUR_MS):
        back = [hour - k * HOUR_MS for k in range(NOWCAST_HOURS)]
        o3 = [means["o3"][h] for h in back[:8] if h in means["o3"]]
        no2 = next((means["no2"][h] for h in back[:2] if h in means["no2"]), None)
        try:
            result = aqi.us_aqi(
                pm25_24h=nowcast([means["pm25"].get(h) for h in back]),
                pm10_24h=nowcast([means["pm10"].get(h) for h in back]),
                o3_8h_ug=sum(o3) / len(o3) if len(o3) >= MIN_8H_HOURS else None,
                no2_1h_ug=no2,
                table=table,
            )
        except aqi.AqiError:
            continue  # no pollutant with enough data in that hour
        out.append((hour, result.value, result.category))
    return out


def evaluate_aqi(store: Store, rule: AqiCategoryRule, now_ms: int) -> list[Finding]:
    level = CATEGORY_RANK[rule.level]
    # a day at least, so that the evidence of a long episode says how long it has lasted
    hours = max(math.ceil(rule.for_minutes / 60) + 2, LOOKBACK_HOURS)
    findings = []
    for zone in _zones(store, rule.zones):
        series = hourly_aqi(store, zone, now_ms, hours)
        if not series or series[-1][0] != _hour_floor(now_ms):
            continue  # the current hour cannot be rated: no judgement
        run: list[tuple[int, int, str]] = []
        for hour, value, category in reversed(series):
            if CATEGORY_RANK[category] < level or (run and run[-1][0] - hour != HOUR_MS):
                break
            run.append((hour, value, category))
        _, value_now, category_now = series[-1]
        since = run[-1][0] if run else now_ms
        lasted_min = (now_ms - since) / MIN_MS if run else 0.0
        holds = bool(run)
        findings.append(
            Finding(
                subject=f"zone:{zone}",
                fires=holds and lasted_min >= rule.for_minutes,
                holds=holds,
                since_ms=since,
                start_ms=since if run else series[-1][0],
                end_ms=now_ms,
                summary=f"{zone}: US AQI {value_now} ({category_now})"
                + (f" at or above {rule.level} for {lasted_min:.0f} min" if run else ""),
                evidence={
                    "zone": zone,
                    "aqi": value_now,
                    "category": category_now,
                    "level": rule.level,
                    "minutes_at_or_above": round(lasted_min, 1),
                    "for_minutes": rule.for_minutes,
                    "looked_back_hours": hours,
                    "hourly_aqi": [
                        {"hour": _iso(h), "aqi": v, "category": c} for h, v, c in reversed(run)
                    ],
                    "index": "US EPA AQI NowCast (analytics.reports.facts.AQI_NOW)",
                },
                link=zone_link(zone),
            )
        )
    return findings


def evaluate_who(store: Store, rule: WhoExceedanceRule, now_ms: int) -> list[Finding]:
    averaging = "8h" if rule.metric == "o3" else "24h"
    guideline = aqi.who_guideline(rule.metric, averaging)
    end = _hour_floor(now_ms) + HOUR_MS
    start = end - rule.period_hours * HOUR_MS
    findings = []
    for zone in _zones(store, rule.zones):
        points: list[SeriesPoint] = store.rollup_series(
            rule.metric, start, end, Resolution.HOUR, zone=zone
        )
        if not points:
            continue
        above = [p for p in points if p.mean > guideline.value]
        fires = len(above) >= rule.min_hours
        worst = max(points, key=lambda p: p.mean)
        findings.append(
            Finding(
                subject=f"zone:{zone}",
                fires=fires,
                holds=fires,
                since_ms=above[0].bucket_ms if above else start,
                start_ms=start,
                end_ms=now_ms,
                summary=f"{zone}: {len(above)} of the last {rule.period_hours} h above the "
                f"WHO 2021 {averaging} guideline for {rule.metric} ({guideline.value:g} "
                f"{guideline.unit})",
                evidence={
                    "zone": zone,
                    "metric": rule.metric,
                    "guideline": guideline.value,
                    "unit": guideline.unit,
                    "averaging": averaging,
                    "hours_above": len(above),
                    "hours_with_data": len(points),
                    "min_hours": rule.min_hours,
                    "period_hours": rule.period_hours,
                    "highest_hourly_mean": round(worst.mean, 2),
                    "highest_hour": _iso(worst.bucket_ms),
                },
                link=zone_link(zone),
            )
        )
    return findings


def evaluate_completeness(store: Store, rule: CompletenessRule, now_ms: int) -> list[Finding]:
    end = _hour_floor(now_ms)  # whole hours: the hourly rollup is what completeness reads
    start = end - rule.window_hours * HOUR_MS
    findings = []
    for c in store.completeness(start, end, rule.interval_s):
        if c.expected == 0:
            continue  # silent the whole window: the offline rule's business
        fires = c.ratio < rule.below
        findings.append(
            Finding(
                subject=f"device:{c.device_id}",
                fires=fires,
                holds=fires,
                since_ms=start,
                start_ms=start,
                end_ms=end,
                summary=f"device {c.device_id} ({c.zone}): {c.ratio:.0%} of its expected "
                f"readings in the last {rule.window_hours} h (below {rule.below:.0%})"
                if fires
                else f"device {c.device_id} ({c.zone}): {c.ratio:.0%} complete",
                evidence={
                    "device_id": c.device_id,
                    "zone": c.zone,
                    "received": c.received,
                    "expected": c.expected,
                    "ratio": round(c.ratio, 4),
                    "below": rule.below,
                    "interval_s": rule.interval_s,
                },
                link=zone_link(c.zone),
            )
        )
    return findings


def evaluate_offline(store: Store, rule: DeviceOfflineRule, now_ms: int) -> list[Finding]:
    limit_ms = rule.after_minutes * MIN_MS
    findings = []
    for d in store.devices():
        if d.status != "active" or d.last_seen_ms is None or d.kind == IMPORT_KIND:
            # revoked, never reported (not installed yet), or an archive's importer
            # identity (`civicmesh import`): history, never "online"
            continue
        silent_ms = now_ms - d.last_seen_ms
        fires = silent_ms > limit_ms
        findings.append(
            Finding(
                subject=f"device:{d.device_id}",
                fires=fires,
                holds=fires,
                since_ms=d.last_seen_ms,
                start_ms=d.last_seen_ms,
                end_ms=now_ms,
                summary=f"device {d.device_id} ({d.zone}): no reading for "
                f"{silent_ms / MIN_MS:.0f} min",
                evidence={
                    "device_id": d.device_id,
                    "zone": d.zone,
                    "last_reading": _iso(d.last_seen_ms),
                    "minutes_silent": round(silent_ms / MIN_MS, 1),
                    "after_minutes": rule.after_minutes,
                },
                link=zone_link(d.zone),
            )
        )
    return findings


def _count_rule(
    store: Store,
    now_ms: int,
    window_minutes: int,
    threshold: int,
    counts: dict[str, int],
    what: str,
) -> list[Finding]:
    """Per registered device: ``counts`` (device -> n in the window) at or above
    ``threshold``; every registered device is judged (none counted: zero)."""
    start = now_ms - window_minutes * MIN_MS
    findings = []
    for d in store.devices():
        n = counts.get(d.device_id, 0)
        fires = n >= threshold
        findings.append(
            Finding(
                subject=f"device:{d.device_id}",
                fires=fires,
                holds=fires,
                since_ms=start,
                start_ms=start,
                end_ms=now_ms,
                summary=f"device {d.device_id} ({d.zone}): {n} {what} in the last "
                f"{window_minutes} min",
                evidence={
                    "device_id": d.device_id,
                    "zone": d.zone,
                    "count": n,
                    "threshold": threshold,
                    "window_minutes": window_minutes,
                },
                link=zone_link(d.zone),
            )
        )
    return findings


def evaluate_faults(store: Store, rule: FaultFlagsRule, now_ms: int) -> list[Finding]:
    start = now_ms - rule.window_minutes * MIN_MS
    counts = store.flagged_readings(start, now_ms, FAULT_FLAGS)
    return _count_rule(
        store, now_ms, rule.window_minutes, rule.min_readings, counts, "fault-flagged readings"
    )


def evaluate_quarantine(store: Store, rule: QuarantineBurstRule, now_ms: int) -> list[Finding]:
    start = now_ms - rule.window_minutes * MIN_MS
    counts = store.quarantine_counts(start, now_ms)
    return _count_rule(
        store, now_ms, rule.window_minutes, rule.min_records, counts, "quarantined batches"
    )


EVALUATORS: dict[str, Callable[[Store, Any, int], list[Finding]]] = {
    "aqi_category": evaluate_aqi,
    "who_exceedance": evaluate_who,
    "completeness": evaluate_completeness,
    "device_offline": evaluate_offline,
    "fault_flags": evaluate_faults,
    "quarantine_burst": evaluate_quarantine,
}


def evaluate(store: Store, rule: AlertRule, now_ms: int) -> list[Finding]:
    """The findings of one rule at ``now_ms``."""
    return EVALUATORS[rule.kind](store, rule, now_ms)
