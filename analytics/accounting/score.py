"""The daily score: a pure function of the day's public data and the rule.

Per device and hour, each metric scores ``share x valid x consistent``: the part of the
expected readings that arrived, the part of those that passed the reading checks, and 0
when the hour's mean is off its neighbours. The hour is the mean over the device's
metrics, and 0 when the clock disagrees with the receive times. The day is the mean of
its 24 hours. Every point lost is attributed to exactly one check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from analytics.accounting.gaming import (
    Duplicate,
    NeighbourVerdict,
    cell_caps,
    cell_of,
    find_duplicates,
    neighbour_check,
)
from analytics.accounting.model import HOUR_MS, DayScores, DeviceDay, DeviceScore, Loss
from analytics.accounting.quality import (
    HOURS,
    READING_CHECKS,
    DeviceHours,
    Intervals,
    device_hours,
    merge_hours,
)
from analytics.accounting.rules import AccountingRule
from analytics.geo import distances_km

EPS = 1e-9


def score_day(
    devices: Sequence[DeviceDay], day_start_ms: int, rule: AccountingRule | None = None
) -> DayScores:
    """Scores of every device for the day starting at ``day_start_ms`` (UTC midnight)."""
    rule = rule or AccountingRule()
    if day_start_ms % (24 * HOUR_MS) != 0:
        raise ValueError("day_start_ms must be a UTC midnight")
    devices = sorted(devices, key=lambda d: d.device_id)
    hours = [device_hours(d, day_start_ms, rule) for d in devices]
    neighbours = _neighbours(devices, hours, rule)
    duplicates = {d.copy: d for d in find_duplicates(devices, day_start_ms, rule)}
    partial: list[tuple[NDArray[np.float64], list[Loss]]] = []
    for dev, dh, verdicts in zip(devices, hours, neighbours, strict=True):
        hourly, losses = _device_score(dev, dh, verdicts, day_start_ms, rule)
        duplicate = duplicates.get(dev.device_id)
        if duplicate is not None:
            losses.append(_duplicate_loss(duplicate, float(hourly.mean())))
            hourly = np.zeros(HOURS)
        partial.append((hourly, losses))
    daily = {d.device_id: float(h.mean()) for d, (h, _) in zip(devices, partial, strict=True)}
    capped = cell_caps(devices, daily, set(duplicates), rule)
    scores = []
    for dev, (hourly, losses) in zip(devices, partial, strict=True):
        reason = capped.get(dev.device_id, "")
        if dev.device_id in duplicates:
            dup = duplicates[dev.device_id]
            reason = f"duplicate stream of {dup.original}"
        scores.append(
            DeviceScore(
                device_id=dev.device_id,
                owner=dev.owner,
                score=daily[dev.device_id],
                hourly=tuple(float(h) for h in hourly),
                losses=tuple(sorted(losses, key=lambda x: -x.points)),
                cell=cell_of(dev, rule.h3_resolution),
                rewarded=not reason and daily[dev.device_id] > 0,
                not_rewarded_because=reason or ("no score" if daily[dev.device_id] <= 0 else ""),
            )
        )
    return DayScores(day_start_ms, rule.rule_id(), tuple(scores))


def _neighbours(
    devices: Sequence[DeviceDay], hours: Sequence[DeviceHours], rule: AccountingRule
) -> list[dict[str, NeighbourVerdict]]:
    dist = distances_km(devices)
    result: list[dict[str, NeighbourVerdict]] = [{} for _ in devices]
    names = sorted({m for dh in hours for m in dh.metrics})
    for metric in names:
        metric_rule = rule.metric_rule("multi", metric)
        if metric_rule is None:
            continue
        means = [dh.metrics[metric].good_mean if metric in dh.metrics else None for dh in hours]
        verdicts = neighbour_check(
            means, dist, metric_rule.neighbour_floor, metric_rule.neighbour_rel, rule
        )
        for i, verdict in enumerate(verdicts):
            if verdict is not None:
                result[i][metric] = verdict
    return result


class _Ledger:
    """Points lost per (check, metric), summed over hours."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, str], float] = {}

    def add(self, check: str, metric: str, points: float) -> None:
        if points > EPS:
            key = (check, metric)
            self.points[key] = self.points.get(key, 0.0) + points


def _device_score(
    dev: DeviceDay,
    dh: DeviceHours,
    verdicts: dict[str, NeighbourVerdict],
    day_start_ms: int,
    rule: AccountingRule,
) -> tuple[NDArray[np.float64], list[Loss]]:
    if not dh.metrics:
        return np.zeros(HOURS), [
            Loss("offline", "*", 1.0, ((day_start_ms, day_start_ms + 24 * HOUR_MS),), "no readings")
        ]
    ledger = _Ledger()
    n = len(dh.metrics)
    total = np.zeros(HOURS)
    for name, mh in dh.metrics.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            bad_share = {
                c: np.where(mh.received > 0, mh.bad[c] / np.maximum(mh.received, 1), 0.0)
                for c in READING_CHECKS
            }
        valid: NDArray[np.float64] = 1.0 - np.sum(list(bad_share.values()), axis=0)
        verdict = verdicts.get(name)
        consistent = np.where(verdict.off, 0.0, 1.0) if verdict is not None else np.ones(HOURS)
        total += mh.share * valid * consistent / n
        missing = (1.0 - mh.share) / n
        offline = np.minimum(missing, dh.offline_share / n)
        # attributed hour by hour, then summed: skewed hours lose everything to the clock
        kept = np.where(dh.skewed, 0.0, 1.0) / HOURS
        ledger.add("offline", "*", float(np.sum(offline * kept)))
        ledger.add("missing", name, float(np.sum((missing - offline) * kept)))
        for check in READING_CHECKS:
            ledger.add(check, name, float(np.sum(mh.share * bad_share[check] / n * kept)))
        lost = mh.share * valid * (1 - consistent) / n
        ledger.add("neighbours", name, float(np.sum(lost * kept)))
    ledger.add("clock", "*", float(np.sum(np.where(dh.skewed, 1.0, 0.0))) / HOURS)
    hourly = np.where(dh.skewed, 0.0, total)
    return hourly, [
        _explain(key, points, dh, verdicts, day_start_ms, rule)
        for key, points in ledger.points.items()
    ]


def _explain(
    key: tuple[str, str],
    points: float,
    dh: DeviceHours,
    verdicts: dict[str, NeighbourVerdict],
    day_start_ms: int,
    rule: AccountingRule,
) -> Loss:
    check, metric = key
    intervals: Intervals = []
    detail = ""
    if check == "offline":
        intervals = dh.offline
    elif check == "missing":
        mh = dh.metrics[metric]
        intervals = [g for g in mh.gaps if not any(a <= g[0] and g[1] <= b for a, b in dh.offline)]
        if not intervals:
            detail = f"{int(mh.received.sum())} readings, fewer than expected"
    elif check in READING_CHECKS:
        intervals = dh.metrics[metric].intervals[check]
        count = dh.metrics[metric].counts[check]
        detail = {
            "range": f"{count} readings out of range",
            "stuck": f"{count} readings",
            "jump": f"{count} readings jump off their neighbours in time",
            "flagged": f"{count} readings flagged faulty by the edge",
        }[check]
    elif check == "neighbours":
        verdict = verdicts[metric]
        intervals = merge_hours(
            [
                (day_start_ms + h * HOUR_MS, day_start_ms + (h + 1) * HOUR_MS)
                for h in np.flatnonzero(verdict.off).tolist()
            ]
        )
        detail = (
            f"hourly mean off the median of {verdict.neighbours} devices within "
            f"{rule.neighbour_radius_km:g} km"
        )
    elif check == "clock":
        intervals = dh.skew_intervals
        skew = dh.skew_s or 0.0
        sign = "+" if skew >= 0 else "-"
        minutes = round(abs(skew) / 60)  # to the minute: the receive time carries a delay
        clock = f"{minutes // 60}:{minutes % 60:02d}"
        detail = f"device clock {sign}{clock} vs receive time"
    return Loss(check, metric, points, tuple(intervals), detail)


def _duplicate_loss(dup: Duplicate, points: float) -> Loss:
    return Loss(
        "duplicate",
        "*",
        points,
        (),
        f"republishes {dup.original} ({dup.metric}, {dup.lag_s // 60} min behind, "
        f"r={dup.corr:.2f})",
    )
