"""Per-device checks over one day: completeness, range, stuck, jump, the edge's fault
flags and the clock. Pure functions of a :class:`DeviceDay`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from analytics.accounting.model import DAY_MS, HOUR_MS, DeviceDay, MetricSeries
from analytics.accounting.rules import AccountingRule, MetricRule
from civicmesh.metrics import Quality

HOURS = 24
# The edge models' verdicts that make a reading worthless for the account. Not counted:
# PARTIAL_WINDOW and GAP (completeness sees those), SIMULATED, UNCALIBRATED.
FAULT_FLAGS = int(
    Quality.OUT_OF_RANGE
    | Quality.STUCK
    | Quality.SPIKE
    | Quality.DRIFT
    | Quality.MODEL_ERROR
    | Quality.IMPLAUSIBLE
)
# In this order a bad reading is blamed on one check only.
READING_CHECKS = ("range", "stuck", "jump", "flagged")
Intervals = list[tuple[int, int]]
STUCK_MAX_GAP_MS = 30 * 60_000


@dataclass(slots=True)
class MetricHours:
    """One metric's day, per hour."""

    received: NDArray[np.float64]  # readings per hour
    share: NDArray[np.float64]  # received / expected, capped at 1
    bad: dict[str, NDArray[np.float64]]  # readings per hour blamed on each check
    intervals: dict[str, Intervals]  # where each check fired
    counts: dict[str, int]  # readings blamed on each check over the day
    good_mean: NDArray[np.float64]  # mean of the good readings per hour (NaN: none)
    gaps: Intervals  # silences longer than the rule allows


@dataclass(slots=True)
class DeviceHours:
    metrics: dict[str, MetricHours]
    offline: Intervals  # silences of the whole device
    offline_share: NDArray[np.float64]  # per hour, the part of it the device was silent
    skewed: NDArray[np.bool_]  # per hour, the clock disagrees with the receive times
    skew_s: float | None  # the clock offset found, seconds (device minus gateway)
    skew_intervals: Intervals = field(default_factory=list)


def hour_index(times: NDArray[np.int64], day_start_ms: int) -> NDArray[np.int64]:
    return np.clip((times - day_start_ms) // HOUR_MS, 0, HOURS - 1)


def merge_marked(
    times: NDArray[np.int64], marked: NDArray[np.bool_], join_ms: int, pad_ms: int
) -> Intervals:
    """Runs of marked readings as [start, end) intervals; runs closer than ``join_ms``
    merge, and each ends ``pad_ms`` after its last reading."""
    picked = times[marked]
    if picked.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(picked) > join_ms)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [picked.size - 1]))
    return [(int(picked[a]), int(picked[b]) + pad_ms) for a, b in zip(starts, ends, strict=True)]


def find_gaps(
    times: NDArray[np.int64], day_start_ms: int, max_gap_ms: int, step_ms: int
) -> Intervals:
    """Silences longer than ``max_gap_ms`` inside the day, the day's edges included."""
    edges = np.concatenate(([day_start_ms - step_ms], times, [day_start_ms + DAY_MS]))
    spans = np.diff(edges)
    where = np.flatnonzero(spans > max_gap_ms)
    return [(int(edges[i]) + step_ms, int(edges[i + 1])) for i in where]


def _coverage(intervals: Intervals, day_start_ms: int) -> NDArray[np.float64]:
    """Per hour, the fraction covered by ``intervals``."""
    cover = np.zeros(HOURS)
    for start, end in intervals:
        for h in range(HOURS):
            lo = day_start_ms + h * HOUR_MS
            overlap = min(end, lo + HOUR_MS) - max(start, lo)
            if overlap > 0:
                cover[h] += overlap / HOUR_MS
    return np.minimum(cover, 1.0)


def stuck_mask(
    times: NDArray[np.int64], values: NDArray[np.float64], rule: MetricRule, max_gap_ms: int
) -> NDArray[np.bool_]:
    """Readings inside a run of equal values lasting at least ``rule.stuck_s``."""
    n = values.size
    mask = np.zeros(n, dtype=bool)
    if n < 2:
        return mask
    same = (np.abs(np.diff(values)) <= rule.stuck_eps) & (np.diff(times) <= max_gap_ms)
    # run boundaries: a new run starts wherever the value changes (or a gap intervenes)
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.concatenate((starts[1:], [n])) - 1
    long_runs = (times[ends] - times[starts]) >= rule.stuck_s * 1000
    for a, b in zip(starts[long_runs], ends[long_runs], strict=True):
        if not any(abs(values[a] - v) <= rule.stuck_eps for v in rule.stuck_exempt):
            mask[a : b + 1] = True
    return mask


def jump_mask(values: NDArray[np.float64], rule: MetricRule) -> NDArray[np.bool_]:
    """Readings further than ``rule.jump`` from the median of their 5-reading
    neighbourhood: isolated spikes, not a level that stays."""
    if values.size < 5:
        return np.zeros(values.size, dtype=bool)
    padded = np.pad(values, 2, mode="edge")
    median = np.median(sliding_window_view(padded, 5), axis=1)
    result: NDArray[np.bool_] = np.abs(values - median) > rule.jump
    return result


def metric_hours(
    series: MetricSeries, rule: MetricRule, day_start_ms: int, interval_s: int, ar: AccountingRule
) -> MetricHours:
    t, v = series.times, series.values
    step_ms = interval_s * 1000
    max_gap_ms = int(ar.gap_intervals * step_ms)
    hours = hour_index(t, day_start_ms)
    received: NDArray[np.float64] = np.bincount(hours, minlength=HOURS).astype(np.float64)
    expected = 3600 / interval_s
    out_of_range = ~np.isfinite(v) | (v < rule.minimum) | (v > rule.maximum)
    jumps = jump_mask(np.nan_to_num(v), rule)
    # A stuck sensor's run survives its glitches (a DHT22 held at 99.9 % sends an odd 1.0)
    # and short silences: runs are found among the other readings, over gaps of up to
    # STUCK_MAX_GAP_MS.
    rest = ~out_of_range & ~jumps
    stuck = np.zeros(v.size, dtype=bool)
    stuck[rest] = stuck_mask(t[rest], v[rest], rule, max(max_gap_ms, STUCK_MAX_GAP_MS))
    masks = {
        "range": out_of_range,
        "stuck": stuck,
        "jump": jumps,
        "flagged": (series.quality & FAULT_FLAGS) != 0,
    }
    taken = np.zeros(v.size, dtype=bool)
    bad: dict[str, NDArray[np.float64]] = {}
    intervals: dict[str, Intervals] = {}
    counts: dict[str, int] = {}
    for check in READING_CHECKS:
        blamed = masks[check] & ~taken
        taken |= masks[check]
        bad[check] = np.bincount(hours, weights=blamed, minlength=HOURS).astype(np.float64)
        counts[check] = int(blamed.sum())
        # stuck runs are reported whole; the other checks where they blame readings
        shown = masks[check] if check == "stuck" else blamed
        intervals[check] = merge_marked(t, shown, max(max_gap_ms, 10 * 60_000), step_ms)
    good = ~taken
    sums = np.bincount(hours, weights=np.where(good, v, 0.0), minlength=HOURS)
    n_good = np.bincount(hours, weights=good, minlength=HOURS)
    with np.errstate(invalid="ignore", divide="ignore"):
        good_mean = np.where(n_good > 0, sums / np.maximum(n_good, 1), np.nan)
    return MetricHours(
        received=received,
        share=np.minimum(received / expected, 1.0),
        bad=bad,
        intervals=intervals,
        counts=counts,
        good_mean=good_mean,
        gaps=find_gaps(t, day_start_ms, max_gap_ms, step_ms),
    )


def clock_check(
    dev: DeviceDay, day_start_ms: int, tolerance_s: int
) -> tuple[NDArray[np.bool_], float | None]:
    """Per hour: does the device clock disagree with the gateway's receive time?

    Each batch speaks for the hours since the batch before it. A receive time before the
    seal time is impossible (clock ahead). A receive time after it is normal delay, or
    an outbox draining after an outage; it is a clock behind only when the lag is steady
    within the hour (an outbox drain makes it shrink batch by batch) and no batch of the
    day arrived promptly.
    """
    skewed = np.zeros(HOURS, dtype=bool)
    if dev.sealed_ms.size == 0:
        return skewed, None
    order = np.argsort(dev.sealed_ms, kind="stable")
    sealed, lag = dev.sealed_ms[order], (dev.received_ms - dev.sealed_ms)[order]
    tol = tolerance_s * 1000
    lo_lag = np.full(HOURS, np.inf)
    hi_lag = np.full(HOURS, -np.inf)
    previous = day_start_ms
    for seal, d in zip(sealed.tolist(), lag.tolist(), strict=True):
        first = max(0, (previous - day_start_ms) // HOUR_MS)
        last = min(HOURS - 1, (seal - day_start_ms) // HOUR_MS)
        if last >= first:
            lo_lag[first : last + 1] = np.minimum(lo_lag[first : last + 1], d)
            hi_lag[first : last + 1] = np.maximum(hi_lag[first : last + 1], d)
        previous = max(previous, seal)
    seen = np.isfinite(lo_lag)
    ahead = seen & (lo_lag < -tol)
    # Behind needs the whole day to agree: a device with a right clock gets at least
    # one batch through promptly on a day it is online, a drained outbox does not hide that.
    behind = seen & (lo_lag > tol) & (hi_lag - lo_lag <= tol) & (float(lag.min()) > tol)
    skewed = ahead | behind
    if not skewed.any():
        return skewed, None
    return skewed, float(-np.median(lo_lag[skewed]) / 1000)


def device_hours(dev: DeviceDay, day_start_ms: int, rule: AccountingRule) -> DeviceHours:
    sensor = rule.sensor_type(dev.kind)
    step_ms = sensor.interval_s * 1000
    metrics: dict[str, MetricHours] = {}
    all_times: list[NDArray[np.int64]] = []
    for name, series in sorted(dev.series.items()):
        metric_rule = sensor.metrics.get(name)
        if metric_rule is None or series.times.size == 0:
            continue
        metrics[name] = metric_hours(series, metric_rule, day_start_ms, sensor.interval_s, rule)
        all_times.append(series.times)
    union = np.unique(np.concatenate(all_times)) if all_times else np.zeros(0, np.int64)
    offline = find_gaps(union, day_start_ms, int(rule.gap_intervals * step_ms), step_ms)
    skewed, skew_s = clock_check(dev, day_start_ms, rule.skew_tolerance_s)
    skew_intervals = [
        (day_start_ms + int(h) * HOUR_MS, day_start_ms + (int(h) + 1) * HOUR_MS)
        for h in np.flatnonzero(skewed)
    ]
    return DeviceHours(
        metrics=metrics,
        offline=offline,
        offline_share=_coverage(offline, day_start_ms),
        skewed=skewed,
        skew_s=skew_s,
        skew_intervals=merge_hours(skew_intervals),
    )


def merge_hours(intervals: Intervals) -> Intervals:
    merged: Intervals = []
    for start, end in intervals:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
