"""Fact sheets: every number a report or an answer may state, computed from the store.

The database does the aggregation (hourly and daily rollups per zone or for the city,
the ledger, quarantine and quality-flag counts); this module derives the facts from
those rows deterministically: weighted means, peaks with their time, WHO 2021 and AQI
exceedances, period-over-period change, day-of-week and hour-of-day patterns, the
traffic/NO2 correlation, completeness and devices with faults. Each fact carries an id,
a value, a unit, the number of decimals it is shown with, and the query window it came
from, so a text can be checked against it and a reader can ask where it came from.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from analytics import aqi
from analytics.store.base import LedgerSpan, Resolution, SeriesPoint, Store
from civicmesh.audit.note import Checkpoint, split_note
from civicmesh.errors import CivicmeshError
from civicmesh.metrics import BY_NAME, Quality

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
AIR_METRICS = ("pm25", "pm10", "no2", "o3", "co")
TRAFFIC_METRICS = ("vehicle_count", "mean_speed")
REPORT_METRICS = AIR_METRICS + TRAFFIC_METRICS
# Measured and answered when asked; reports and broad questions keep to REPORT_METRICS.
WEATHER_METRICS = ("temperature", "relativehumidity")
MEASURED_METRICS = (*REPORT_METRICS, "occupancy", *WEATHER_METRICS)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# A reading flagged with any of these is a fault or an anomaly found at the edge.
FAULT_FLAGS = int(
    Quality.OUT_OF_RANGE | Quality.STUCK | Quality.SPIKE | Quality.DRIFT | Quality.IMPLAUSIBLE
)
LOW_COMPLETENESS = 0.8
GAP_COMPLETENESS = 0.95  # a device below this has a gap worth naming in a report
MAX_LISTED_DAYS = 7  # exceedance days named one by one
# Days need this share of their hours, 8-h means 6 of 8 hours (the usual 75% rule).
MIN_DAY_HOURS = 18
MIN_8H_HOURS = 6
LABELS = {
    "pm25": "PM2.5",
    "pm10": "PM10",
    "no2": "NO2",
    "o3": "ozone",
    "co": "CO",
    "vehicle_count": "traffic volume",
    "mean_speed": "traffic speed",
    "occupancy": "road occupancy",
    "temperature": "temperature",
    "relativehumidity": "relative humidity",
}


class FactSheetError(CivicmeshError):
    reason = "facts.invalid"


@dataclass(frozen=True, slots=True)
class Fact:
    """One stated number (or time, weekday or device id) with where it came from."""

    id: str
    value: float | int | str
    unit: str
    label: str  # plain words for what it is: "mean PM2.5"
    start_ms: int  # the query window the value was computed over
    end_ms: int
    source: str  # the table or query it came from
    decimals: int = 1

    @property
    def text(self) -> str:
        """The value as the text shows it (with its unit, where it has one)."""
        if isinstance(self.value, str):
            return self.value
        number = format_number(self.value, self.decimals)
        if self.unit in ("", "r", "count", "AQI"):
            return number
        if self.unit == "%":
            return f"{number}%"
        return f"{number} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "value": self.value,
            "unit": self.unit,
            "text": self.text,
            "label": self.label,
            "start": iso(self.start_ms),
            "end": iso(self.end_ms),
            "source": self.source,
        }


def format_number(value: float | int, decimals: int) -> str:
    if isinstance(value, int) or decimals == 0:
        return f"{round(value):,d}"
    return f"{value:.{decimals}f}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo("UTC")).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class FactSheet:
    """The facts about one scope (a zone, or the city) over one period."""

    scope: str  # the zone name, or "city"
    zone: str | None
    start_ms: int
    end_ms: int
    timezone: str
    facts: tuple[Fact, ...]
    ledger: LedgerSpan
    metrics: tuple[str, ...] = field(default=())  # the metrics asked about
    # The audit log's checkpoint the sheet was computed at (size, base64 root): anyone can
    # check that its batches are in the public log (issue 21). None: no checkpoint yet.
    checkpoint: tuple[int, str] | None = None

    def get(self, fact_id: str) -> Fact | None:
        for fact in self.facts:
            if fact.id == fact_id:
                return fact
        return None

    def __contains__(self, fact_id: object) -> bool:
        return any(f.id == fact_id for f in self.facts)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(f.id for f in self.facts)

    def local(self, ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, ZoneInfo(self.timezone))

    def period_text(self) -> str:
        """ "16 Nov 2026 to 22 Nov 2026" in the sheet's time zone (end inclusive)."""
        first = self.local(self.start_ms)
        last = self.local(self.end_ms - 1)
        if first.date() == last.date():
            if self.end_ms - self.start_ms >= DAY_MS - HOUR_MS:
                return first.strftime("%d %b %Y")
            return f"{first:%d %b %Y %H:%M}–{self.local(self.end_ms):%H:%M}"
        return f"{first:%d %b %Y} to {last:%d %b %Y}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "zone": self.zone,
            "start": iso(self.start_ms),
            "end": iso(self.end_ms),
            "timezone": self.timezone,
            "facts": [f.to_dict() for f in self.facts],
            "ledger": dict(ledger_dict(self.ledger), checkpoint=checkpoint_dict(self.checkpoint)),
        }


def checkpoint_dict(checkpoint: tuple[int, str] | None) -> dict[str, Any] | None:
    return None if checkpoint is None else {"size": checkpoint[0], "root": checkpoint[1]}


def audit_checkpoint(store: Store) -> tuple[int, str] | None:
    """The store's latest audit-log checkpoint as (size, base64 root), if any."""
    audit = getattr(store, "audit", None)
    latest = audit.latest_checkpoint() if audit is not None else None
    if latest is None:
        return None
    cp = Checkpoint.parse(split_note(latest[1])[0])
    return cp.size, base64.b64encode(cp.root).decode()


def ledger_dict(span: LedgerSpan) -> dict[str, Any]:
    return {
        "batches": span.batches,
        "devices": len(span.heads),
        "digest": span.digest(),
        "chains": [
            {
                "device_id": h.device_id,
                "first_seq": h.first_seq,
                "last_seq": h.last_seq,
                "batches": h.batches,
                "head_hash": h.head_hash.hex(),
            }
            for h in span.heads
        ],
    }


# ------------------------------------------------------------------------ building


@dataclass
class _Collector:
    start_ms: int
    end_ms: int
    facts: list[Fact] = field(default_factory=list)

    def add(
        self,
        fact_id: str,
        value: float | int | str,
        unit: str,
        label: str,
        source: str,
        *,
        decimals: int = 1,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            return  # nothing to state (no data, or a correlation of a constant)
        self.facts.append(
            Fact(
                fact_id,
                value,
                unit,
                label,
                self.start_ms if start_ms is None else start_ms,
                self.end_ms if end_ms is None else end_ms,
                source,
                decimals,
            )
        )


def build_fact_sheet(
    store: Store,
    start_ms: int,
    end_ms: int,
    *,
    zone: str | None = None,
    timezone: str = "UTC",
    metrics: Sequence[str] = REPORT_METRICS,
    window_s: int = 60,
    days: str | None = None,
    hours: tuple[int, int] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    aqi_now: bool = False,
) -> FactSheet:
    """The fact sheet of ``zone`` (None: the whole city) over ``[start_ms, end_ms)``.

    Days and weekdays are local days of ``timezone``; the previous period (for changes)
    is the window of the same length just before. ``window_s`` is the devices' reading
    window. ``days`` ("weekdays"/"weekends") and ``hours`` (local ``[from, to)``) keep
    only those hours (devices and completeness cover all). ``pairs``: metrics to correlate.
    """
    tz = _checked(start_ms, end_ms, metrics, timezone)
    # Hourly buckets are whole UTC hours: widen to them so every bucket counts fully.
    lo = start_ms - start_ms % HOUR_MS
    hi = end_ms + (-end_ms) % HOUR_MS
    span = hi - lo
    source = "rollup_zone_1h" if zone is not None else "rollup_zone_1h (all zones)"
    out = _Collector(lo, hi)
    hourly: dict[str, list[SeriesPoint]] = {}
    keep = HourFilter(tz, days, hours)
    for metric in dict.fromkeys([*metrics, *(m for pair in pairs for m in pair)]):
        points = keep(store.rollup_series(metric, lo, hi, Resolution.HOUR, zone=zone))
        previous = keep(store.rollup_series(metric, lo - span, lo, Resolution.HOUR, zone=zone))
        hourly[metric] = points
        if metric in metrics:
            _metric_facts(out, metric, points, previous, tz, source, lo - span)
    if "vehicle_count" in hourly and "no2" in hourly:
        _correlation(out, hourly["vehicle_count"], hourly["no2"], source)
    for a, b in pairs:
        _pair_correlation(out, a, b, hourly[a], hourly[b], source)
    _coverage(out, hourly, [m for m in metrics if m in hourly], keep, lo, hi)
    if any(m in AIR_METRICS for m in metrics):
        _aqi_facts(out, hourly, tz, source)
    if aqi_now:
        result = current_aqi(store, zone, end_ms - 1)
        if result is not None:
            _aqi_now_facts(out, result, "rollup_zone_1h, NowCast")
    _device_facts(out, store, zone, window_s)
    sheet = FactSheet(
        scope=zone or "city",
        zone=zone,
        start_ms=lo,
        end_ms=hi,
        timezone=timezone,
        facts=tuple(out.facts),
        ledger=store.ledger_span(lo, hi, zone=zone),
        metrics=tuple(metrics),
        checkpoint=audit_checkpoint(store),
    )
    return sheet


def _checked(start_ms: int, end_ms: int, metrics: Sequence[str], timezone: str) -> ZoneInfo:
    if end_ms <= start_ms:
        raise FactSheetError(f"Empty period: end {iso(end_ms)} is not after {iso(start_ms)}")
    unknown = [m for m in metrics if m not in MEASURED_METRICS]
    if unknown:
        raise FactSheetError(
            f"No facts for metric {unknown[0]!r}; facts cover {', '.join(MEASURED_METRICS)}"
        )
    try:
        return ZoneInfo(timezone)
    except (KeyError, ValueError) as exc:
        raise FactSheetError(f"Unknown time zone {timezone!r}") from exc


@dataclass(frozen=True, slots=True)
class HourFilter:
    """Keeps the hourly points of the asked weekdays or weekends and hours of the day."""

    tz: ZoneInfo
    days: str | None = None
    hours: tuple[int, int] | None = None

    def wanted(self, bucket_ms: int) -> bool:
        local = datetime.fromtimestamp(bucket_ms / 1000, self.tz)
        if self.days is not None and (local.weekday() >= 5) != (self.days == "weekends"):
            return False
        return self.hours is None or self.hours[0] <= local.hour < self.hours[1]

    def __call__(self, points: Sequence[SeriesPoint]) -> list[SeriesPoint]:
        if self.days is None and self.hours is None:
            return list(points)
        return [p for p in points if self.wanted(p.bucket_ms)]


def _coverage(
    out: _Collector,
    hourly: dict[str, list[SeriesPoint]],
    metrics: Sequence[str],
    keep: HourFilter,
    lo: int,
    hi: int,
) -> None:
    """Hours of the period (after the filters) and how many of them hold data."""
    expected = sum(1 for t in range(lo, hi, HOUR_MS) if keep.wanted(t))
    if not expected or not metrics:
        return
    with_data = len({p.bucket_ms for m in metrics for p in hourly[m]})
    out.add("coverage.hours", with_data, "hours", "hours with data", "rollup_zone_1h", decimals=0)
    out.add(
        "coverage.hours_expected",
        expected,
        "hours",
        "hours in the period",
        "rollup_zone_1h",
        decimals=0,
    )


def strength(r: float) -> str:
    """Words for a correlation coefficient (Cohen's rule of thumb)."""
    size = abs(r)
    if size < 0.1:
        return "no clear"
    word = "a weak" if size < 0.3 else "a moderate" if size < 0.5 else "a strong"
    return f"{word} {'positive' if r > 0 else 'negative'}"


def _pair_correlation(
    out: _Collector,
    a: str,
    b: str,
    xs: Sequence[SeriesPoint],
    ys: Sequence[SeriesPoint],
    source: str,
) -> None:
    by_hour = {p.bucket_ms: p.mean for p in xs}
    pairs = [(by_hour[p.bucket_ms], p.mean) for p in ys if p.bucket_ms in by_hour]
    if len(pairs) < 12:
        return
    r = pearson([x for x, _ in pairs], [y for _, y in pairs])
    if not math.isfinite(r):
        return
    key = f"corr.{a}.{b}"
    label = f"{LABELS[a]} and {LABELS[b]}"
    out.add(f"{key}.r", r, "r", f"Pearson correlation of hourly {label}", source, decimals=2)
    out.add(f"{key}.hours", len(pairs), "hours", f"hours with both {label}", source, decimals=0)
    out.add(f"{key}.strength", strength(r), "words", f"strength of the link of {label}", source)


def weighted_mean(points: Iterable[SeriesPoint]) -> tuple[float, int]:
    total = n = 0.0
    for p in points:
        total += p.mean * p.count
        n += p.count
    return (total / n if n else math.nan), int(n)


def daily_means(points: Sequence[SeriesPoint], tz: ZoneInfo) -> dict[str, float]:
    """Local date (ISO) -> mean of its hourly means, for days with enough hours."""
    by_day: dict[str, list[float]] = defaultdict(list)
    for p in points:
        by_day[datetime.fromtimestamp(p.bucket_ms / 1000, tz).date().isoformat()].append(p.mean)
    return {d: sum(v) / len(v) for d, v in sorted(by_day.items()) if len(v) >= MIN_DAY_HOURS}


def daily_max_8h(points: Sequence[SeriesPoint], tz: ZoneInfo) -> dict[str, float]:
    """Local date -> highest 8-hour running mean starting that day (O3's WHO metric)."""
    by_hour = {p.bucket_ms: p.mean for p in points}
    best: dict[str, float] = {}
    for start in sorted(by_hour):
        window = [by_hour[start + k * HOUR_MS] for k in range(8) if start + k * HOUR_MS in by_hour]
        if len(window) < MIN_8H_HOURS:
            continue
        day = datetime.fromtimestamp(start / 1000, tz).date().isoformat()
        best[day] = max(best.get(day, -math.inf), sum(window) / len(window))
    return best


def _metric_facts(
    out: _Collector,
    metric: str,
    points: Sequence[SeriesPoint],
    previous: Sequence[SeriesPoint],
    tz: ZoneInfo,
    source: str,
    previous_start: int,
) -> None:
    if not points:
        return
    unit = BY_NAME[metric].unit
    label = LABELS[metric]
    decimals = 2 if metric == "co" else 1
    mean, n = weighted_mean(points)
    if metric == "vehicle_count":
        total = sum(round(p.mean * p.count) for p in points)
        out.add("vehicle_count.total", int(total), "vehicles", "vehicles counted", source)
        out.add(
            "vehicle_count.mean",
            mean,
            "vehicles per window",
            "mean vehicles per counting window",
            source,
        )
    else:
        out.add(f"{metric}.mean", mean, unit, f"mean {label}", source, decimals=decimals)
    out.add(f"{metric}.readings", n, "count", f"{label} readings", source, decimals=0)
    out.add(f"{metric}.hours", len(points), "hours", f"hours with {label} data", source, decimals=0)
    _peak_facts(out, metric, points, tz, source)
    if previous:
        _change_facts(out, metric, mean, previous, source, previous_start)
    _patterns(out, metric, points, tz, source, decimals)
    if metric in AIR_METRICS:
        _who_facts(out, metric, points, tz, source)


def _peak_facts(
    out: _Collector, metric: str, points: Sequence[SeriesPoint], tz: ZoneInfo, source: str
) -> None:
    unit = BY_NAME[metric].unit
    label = LABELS[metric]
    decimals = 2 if metric == "co" else 1
    peak = max(points, key=lambda p: p.mean)
    peak_unit = "vehicles per window" if metric == "vehicle_count" else unit
    out.add(
        f"{metric}.peak_hour",
        peak.mean,
        peak_unit,
        f"highest hourly {label}",
        source,
        decimals=decimals,
    )
    when = datetime.fromtimestamp(peak.bucket_ms / 1000, tz)
    out.add(
        f"{metric}.peak_hour.time",
        when.strftime("%a %d %b %H:%M"),
        "time",
        f"hour of the highest {label}",
        source,
    )
    out.add(
        f"{metric}.max",
        peak_max(points),
        peak_unit,
        f"highest single {label} reading",
        source,
        decimals=decimals,
    )
    if metric == "mean_speed":
        lowest = min(points, key=lambda p: p.mean)
        out.add("mean_speed.lowest_hour", lowest.mean, unit, "lowest hourly traffic speed", source)


def _change_facts(
    out: _Collector,
    metric: str,
    mean: float,
    previous: Sequence[SeriesPoint],
    source: str,
    previous_start: int,
) -> None:
    unit = "vehicles per window" if metric == "vehicle_count" else BY_NAME[metric].unit
    label = LABELS[metric]
    decimals = 2 if metric == "co" else 1
    before, _ = weighted_mean(previous)
    out.add(
        f"{metric}.previous_mean",
        before,
        unit,
        f"{label} in the previous period",
        source,
        decimals=decimals,
        start_ms=previous_start,
        end_ms=out.start_ms,
    )
    if before > 0:
        change = (mean - before) / before * 100.0
        out.add(
            f"{metric}.change_pct",
            abs(change),
            "%",
            f"change of {label} against the previous period",
            source,
            start_ms=previous_start,
        )
        direction = "up" if change > 0.05 else "down" if change < -0.05 else "unchanged"
        out.add(
            f"{metric}.change_direction",
            direction,
            "direction",
            f"direction of the change of {label}",
            source,
            start_ms=previous_start,
        )


def peak_max(points: Sequence[SeriesPoint]) -> float:
    return max(p.max for p in points)


def _patterns(
    out: _Collector,
    metric: str,
    points: Sequence[SeriesPoint],
    tz: ZoneInfo,
    source: str,
    decimals: int,
) -> None:
    label = LABELS[metric]
    by_hour: dict[int, list[float]] = defaultdict(list)
    by_weekday: dict[int, list[float]] = defaultdict(list)
    for p in points:
        local = datetime.fromtimestamp(p.bucket_ms / 1000, tz)
        by_hour[local.hour].append(p.mean)
        by_weekday[local.weekday()].append(p.mean)
    if len(by_hour) >= 12:
        hour = max(by_hour, key=lambda h: sum(by_hour[h]) / len(by_hour[h]))
        out.add(
            f"{metric}.busiest_hour_of_day"
            if metric == "vehicle_count"
            else f"{metric}.peak_hour_of_day",
            f"{hour:02d}:00",
            "hour of day",
            f"hour of day with the highest mean {label}",
            source,
        )
    if len(by_weekday) == 7:
        _weekday_facts(out, metric, by_weekday, source, decimals)


def _weekday_facts(
    out: _Collector, metric: str, by_weekday: dict[int, list[float]], source: str, decimals: int
) -> None:
    label = LABELS[metric]
    means = {d: sum(v) / len(v) for d, v in by_weekday.items()}
    high = max(means, key=lambda d: means[d])
    low = min(means, key=lambda d: means[d])
    unit = "vehicles per window" if metric == "vehicle_count" else BY_NAME[metric].unit
    out.add(
        f"{metric}.weekday_high",
        WEEKDAYS[high],
        "weekday",
        f"weekday with the highest mean {label}",
        source,
    )
    out.add(
        f"{metric}.weekday_high.mean",
        means[high],
        unit,
        f"mean {label} on that weekday",
        source,
        decimals=decimals,
    )
    out.add(
        f"{metric}.weekday_low",
        WEEKDAYS[low],
        "weekday",
        f"weekday with the lowest mean {label}",
        source,
    )
    out.add(
        f"{metric}.weekday_low.mean",
        means[low],
        unit,
        f"mean {label} on that weekday",
        source,
        decimals=decimals,
    )
    weekend = [m for d, m in means.items() if d >= 5]
    weekday = [m for d, m in means.items() if d < 5]
    out.add(
        f"{metric}.weekend_mean",
        sum(weekend) / len(weekend),
        unit,
        f"mean {label} at weekends",
        source,
        decimals=decimals,
    )
    out.add(
        f"{metric}.workday_mean",
        sum(weekday) / len(weekday),
        unit,
        f"mean {label} on working days",
        source,
        decimals=decimals,
    )


def _who_facts(
    out: _Collector, metric: str, points: Sequence[SeriesPoint], tz: ZoneInfo, source: str
) -> None:
    label = LABELS[metric]
    if metric == "o3":
        days = daily_max_8h(points, tz)
        averaging = "8h"
        what = "days whose highest 8-hour mean ozone exceeded the WHO 2021 guideline"
    else:
        days = daily_means(points, tz)
        averaging = "24h"
        what = f"days whose mean {label} exceeded the WHO 2021 24-hour guideline"
    guideline = aqi.who_guideline(metric, averaging)
    out.add(
        f"{metric}.who_guideline",
        guideline.value,
        guideline.unit,
        f"WHO 2021 {averaging} guideline for {label}",
        aqi.WHO_2021_VERSION,
        decimals=0 if guideline.value >= 10 else 1,
    )
    if days:
        count = aqi.who_exceedances(metric, days.values(), averaging)
        out.add(
            f"{metric}.who_exceedance_days", count.exceedances, "days", what, source, decimals=0
        )
        out.add(
            f"{metric}.who_days",
            count.periods,
            "days",
            f"days with enough {label} data to judge",
            source,
            decimals=0,
        )
        above = [d for d, v in days.items() if v > guideline.value]
        for i, day in enumerate(above[:MAX_LISTED_DAYS]):
            out.add(
                f"{metric}.who_exceedance_day.{i + 1}",
                datetime.fromisoformat(day).strftime("%a %d %b"),
                "date",
                f"a day above the WHO 2021 guideline for {label}",
                source,
            )
    hours = sum(1 for p in points if p.mean > guideline.value)
    out.add(
        f"{metric}.hours_above_who",
        hours,
        "hours",
        f"hours whose mean {label} was above the WHO 2021 {averaging} level",
        source,
        decimals=0,
    )


def _aqi_facts(
    out: _Collector, hourly: dict[str, list[SeriesPoint]], tz: ZoneInfo, source: str
) -> None:
    """Daily US AQI from daily PM means, the daily 1-h NO2 peak and 8-h O3 peak."""
    pm25 = daily_means(hourly.get("pm25", []), tz)
    pm10 = daily_means(hourly.get("pm10", []), tz)
    o3 = daily_max_8h(hourly.get("o3", []), tz)
    no2_peak: dict[str, float] = {}
    for p in hourly.get("no2", []):
        day = datetime.fromtimestamp(p.bucket_ms / 1000, tz).date().isoformat()
        no2_peak[day] = max(no2_peak.get(day, 0.0), p.mean)
    results = _daily_aqi(pm25, pm10, o3, no2_peak)
    _eaqi_hours(out, hourly, source)
    if results:
        _aqi_day_facts(out, results, source)


def _daily_aqi(
    pm25: dict[str, float],
    pm10: dict[str, float],
    o3: dict[str, float],
    no2_peak: dict[str, float],
) -> list[tuple[str, aqi.IndexResult]]:
    """(local date, daily US AQI) for each day some pollutant can rate (AQI_DAILY)."""
    results = []
    for day in sorted(set(pm25) | set(pm10) | set(o3)):
        try:
            table = aqi.epa_table_for(datetime.fromisoformat(day))
            results.append(
                (
                    day,
                    aqi.us_aqi(
                        pm25_24h=pm25.get(day),
                        pm10_24h=pm10.get(day),
                        o3_8h_ug=o3.get(day),
                        no2_1h_ug=no2_peak.get(day),
                        table=table,
                    ),
                )
            )
        except aqi.AqiError:
            continue  # a day the tables cannot rate (no pollutant with enough data)
    return results


def _aqi_day_facts(
    out: _Collector, results: list[tuple[str, aqi.IndexResult]], source: str
) -> None:
    worst_day, worst = max(results, key=lambda r: r[1].value)
    version = worst.table_version
    out.add(
        "aqi.worst_day", worst.value, "AQI", f"highest daily US AQI ({version})", source, decimals=0
    )
    out.add(
        "aqi.worst_day.date",
        datetime.fromisoformat(worst_day).strftime("%a %d %b"),
        "date",
        "day of the highest daily US AQI",
        source,
    )
    out.add(
        "aqi.worst_day.category", worst.category, "category", "US AQI category of that day", source
    )
    out.add(
        "aqi.worst_day.pollutant",
        LABELS.get(worst.dominant.split("_")[0], worst.dominant),
        "pollutant",
        "pollutant that set that day's AQI",
        source,
    )
    categories: dict[str, int] = defaultdict(int)
    for _, result in results:
        categories[result.category] += 1
    for category, count in categories.items():
        key = category.lower().replace(" ", "_")
        out.add(
            f"aqi.days.{key}",
            count,
            "days",
            f"days rated {category} by the US AQI",
            source,
            decimals=0,
        )
    out.add("aqi.days", len(results), "days", "days with a daily US AQI", source, decimals=0)


EAQI = "eea-eaqi-2017"
# The one AQI of answers, reports and the dashboard (README: AQI definition).
AQI_DAILY = (
    "US EPA AQI, daily: 24-hour mean PM2.5 and PM10, highest 8-hour mean ozone, highest "
    "1-hour NO2; the EPA table in force on the day (2012 breakpoints before 6 May 2024, "
    "2024 after)"
)
AQI_NOW = (
    "US EPA AQI now: NowCast of the last 12 hourly PM2.5 and PM10 means, the last 8 hours' "
    "mean ozone and the last hour's NO2; the EPA table in force today"
)


def nowcast(hourly: Sequence[float | None]) -> float | None:
    """EPA NowCast of hourly means, the most recent first (12 hours; 2 of the last 3
    needed). The weight factor is the range ratio, at least 0.5."""
    values = list(hourly[:12])
    if sum(v is not None for v in values[:3]) < 2:
        return None
    known = [v for v in values if v is not None]
    high = max(known)
    weight = max(min(known) / high, 0.5) if high > 0 else 1.0
    total = norm = 0.0
    for i, value in enumerate(values):
        if value is not None:
            total += weight**i * value
            norm += weight**i
    return total / norm


def current_aqi(store: Store, zone: str | None, now_ms: int) -> aqi.IndexResult | None:
    """The current US AQI of ``zone`` (None: the city) by :data:`AQI_NOW`; None without
    data. The dashboard and /ask both use this one."""
    end = now_ms - now_ms % HOUR_MS + HOUR_MS
    series = {
        m: {
            p.bucket_ms: p.mean
            for p in store.rollup_series(m, end - 12 * HOUR_MS, end, Resolution.HOUR, zone=zone)
        }
        for m in ("pm25", "pm10", "o3", "no2")
    }
    hours = [end - (k + 1) * HOUR_MS for k in range(12)]
    pm25 = nowcast([series["pm25"].get(h) for h in hours])
    pm10 = nowcast([series["pm10"].get(h) for h in hours])
    o3 = [series["o3"][h] for h in hours[:8] if h in series["o3"]]
    no2 = next((series["no2"][h] for h in hours[:2] if h in series["no2"]), None)
    try:
        return aqi.us_aqi(
            pm25_24h=pm25,
            pm10_24h=pm10,
            o3_8h_ug=sum(o3) / len(o3) if len(o3) >= MIN_8H_HOURS else None,
            no2_1h_ug=no2,
            table=aqi.epa_table_for(datetime.fromtimestamp(now_ms / 1000, ZoneInfo("UTC"))),
        )
    except aqi.AqiError:
        return None


def _aqi_now_facts(out: _Collector, result: aqi.IndexResult, source: str) -> None:
    out.add(
        "aqi.now",
        result.value,
        "AQI",
        f"current US AQI ({result.table_version})",
        source,
        decimals=0,
    )
    out.add("aqi.now.category", result.category, "category", "US AQI category now", source)
    out.add(
        "aqi.now.pollutant",
        LABELS.get(result.dominant.split("_")[0], result.dominant),
        "pollutant",
        "pollutant that sets the current AQI",
        source,
    )
    out.add("aqi.now.table", result.table_version, "table", "EPA table used", aqi.__name__)


def _eaqi_hours(out: _Collector, hourly: dict[str, list[SeriesPoint]], source: str) -> None:
    """Hours per European AQI band for the pollutants it rates hour by hour (NO2, O3)."""
    for metric in ("no2", "o3"):
        points = hourly.get(metric, [])
        if not points:
            continue
        bands: dict[str, int] = defaultdict(int)
        for p in points:
            bands[aqi.sub_index(metric, max(0.0, p.mean), EAQI).category] += 1
        for category, hours in bands.items():
            key = category.lower().replace(" ", "_")
            out.add(
                f"{metric}.eaqi_hours.{key}",
                hours,
                "hours",
                f"hours of {LABELS[metric]} rated {category} by the European AQI ({EAQI})",
                source,
                decimals=0,
            )
        poor = sum(n for c, n in bands.items() if c in ("Poor", "Very poor", "Extremely poor"))
        out.add(
            f"{metric}.eaqi_hours.poor_or_worse",
            poor,
            "hours",
            f"hours of {LABELS[metric]} rated Poor or worse by the European AQI",
            source,
            decimals=0,
        )


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 3:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def _correlation(
    out: _Collector, traffic: Sequence[SeriesPoint], no2: Sequence[SeriesPoint], source: str
) -> None:
    by_hour = {p.bucket_ms: p.mean for p in traffic}
    pairs = [(by_hour[p.bucket_ms], p.mean) for p in no2 if p.bucket_ms in by_hour]
    if len(pairs) < 24:
        return
    r = pearson([a for a, _ in pairs], [b for _, b in pairs])
    out.add(
        "traffic_no2.r",
        r,
        "r",
        "correlation of hourly traffic volume with NO2 (Pearson r)",
        source,
        decimals=2,
    )
    out.add(
        "traffic_no2.hours",
        len(pairs),
        "hours",
        "hours with both traffic and NO2 data",
        source,
        decimals=0,
    )


def _device_facts(out: _Collector, store: Store, zone: str | None, window_s: int) -> None:
    lo, hi = out.start_ms, out.end_ms
    completeness = store.completeness(lo, hi, window_s, zone=zone)
    registered = len(completeness)
    if registered == 0:
        return
    reporting = [c for c in completeness if c.received > 0]
    expected = sum(c.expected for c in reporting)
    out.add(
        "devices.registered", registered, "devices", "registered devices", "devices", decimals=0
    )
    out.add(
        "devices.reporting",
        len(reporting),
        "devices",
        "devices that reported",
        "rollup_1h",
        decimals=0,
    )
    if expected:
        ratios = {c.device_id: c.ratio for c in completeness}
        overall = sum(ratios.values()) / registered
        out.add("completeness.pct", overall * 100.0, "%", "data completeness", "rollup_1h")
        low = sorted(d for d, r in ratios.items() if r < LOW_COMPLETENESS)
        out.add(
            "devices.low_completeness",
            len(low),
            "devices",
            f"devices with less than {LOW_COMPLETENESS:.0%} of their data",
            "rollup_1h",
            decimals=0,
        )
        for i, device in enumerate(low):
            out.add(
                f"devices.low_completeness.{i + 1}",
                device,
                "device",
                "a device with gaps",
                "rollup_1h",
            )
        _gap_facts(out, ratios)
    _fault_facts(out, store, zone)


def _gap_facts(out: _Collector, ratios: dict[str, float]) -> None:
    gaps = sorted(d for d, r in ratios.items() if r < GAP_COMPLETENESS)
    out.add(
        "devices.gaps",
        len(gaps),
        "devices",
        f"devices with less than {GAP_COMPLETENESS:.0%} of their data",
        "rollup_1h",
        decimals=0,
    )
    for i, device in enumerate(gaps[:6]):
        out.add(f"devices.gap.{i + 1}", device, "device", "a device with gaps", "rollup_1h")
        out.add(
            f"devices.gap.{i + 1}.pct",
            ratios[device] * 100.0,
            "%",
            "share of its expected readings that it sent",
            "rollup_1h",
            decimals=0,
        )


def _fault_facts(out: _Collector, store: Store, zone: str | None) -> None:
    lo, hi = out.start_ms, out.end_ms
    flagged = store.flagged_readings(lo, hi, FAULT_FLAGS, zone=zone)
    quarantined = store.quarantine_counts(lo, hi, zone=zone)
    faulty = sorted(set(flagged) | set(quarantined))
    out.add(
        "devices.faulty",
        len(faulty),
        "devices",
        "devices with fault-flagged readings or quarantined batches",
        "readings, quarantine",
        decimals=0,
    )
    out.add(
        "readings.flagged",
        sum(flagged.values()),
        "readings",
        "readings flagged stuck, spike, drift or out of range",
        "readings",
        decimals=0,
    )
    out.add(
        "batches.quarantined",
        sum(quarantined.values()),
        "batches",
        "batches quarantined",
        "quarantine",
        decimals=0,
    )
    for i, device in enumerate(faulty):
        out.add(
            f"devices.faulty.{i + 1}",
            device,
            "device",
            "a device with faults",
            "readings, quarantine",
        )
