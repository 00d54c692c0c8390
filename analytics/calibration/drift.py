"""Network-wide drift detection on hourly means: every device against its neighbours.

For device ``i`` and hour ``t`` the detector compares ``r_i(t) = log(x_i + c) -
log(m_i + c)``, where ``m_i`` is the median of the hourly means of the devices within
``radius_km`` (references included) and ``c`` a per-metric floor that keeps clean air
from turning noise into large ratios. A city-wide change moves ``x_i`` and ``m_i``
together and leaves ``r_i`` alone; a stable local difference (a busy road, a sheltered
garden) is a stable ``r_i``, which the device's own baseline (the median of ``r_i`` over
``baseline_h`` hours ending ``gap_h`` hours before ``t``) absorbs. What is left, the
departure ``d_i(t) = r_i(t) - baseline``, smoothed by a causal running median, alarms
when it stays beyond ``max(tol_floor, k * 1.4826 * MAD)`` of the baseline hours for
``persist_h`` hours in a row. An alarm carries its evidence: the neighbours (distance,
reference or not), the size of the departure, and since when (the first hour of the run
of growing departure that led to it).

Everything here is a pure function of the hourly table: the same input, the same alarms.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from analytics.geo import distances_km

HOUR_MS = 3_600_000

# Added to both sides of the ratio, in the metric's unit: below a few µg/m³ an SDS011's
# hourly mean is mostly noise, and a ratio of two noises is not evidence.
METRIC_FLOOR = {
    "pm25": 2.0,
    "pm10": 4.0,
    "no2": 10.0,
    "o3": 10.0,
    "co": 0.2,
}
METRICS = tuple(METRIC_FLOOR)


@dataclass(frozen=True, slots=True)
class DriftRule:
    """The detector's parameters (tuned on the tuning half of the Aberdeen devices only;
    docs/calibration.md)."""

    radius_km: float = 5.0  # neighbours: devices within this distance
    min_neighbours: int = 1  # hours with fewer neighbours present are not judged
    baseline_h: int = 48  # the device's own baseline of r_i: this many hours ...
    gap_h: int = 36  # ... ending this many hours before the hour judged
    min_baseline_h: int = 12  # fewer valid baseline hours: not judged
    smooth_h: int = 18  # causal running median of the departure
    k: float = 3.0  # tolerance: k robust standard deviations of the baseline ...
    tol_floor: float = 0.3  # ... and never below this (log ratio; 0.3 = x1.35)
    persist_h: int = 4  # hours beyond the tolerance in a row before an alarm
    correction_h: int = 6  # hours of residuals behind each correction estimate
    merge_h: int = 6  # alarm runs this close (hours between) are one alarm

    def __post_init__(self) -> None:
        positive = ("radius_km", "k", "tol_floor")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DriftRule.{name} must be a positive number, got {value!r}")
        counts = ("min_neighbours", "baseline_h", "min_baseline_h", "smooth_h", "persist_h")
        for name in (*counts, "correction_h", "merge_h"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DriftRule.{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.gap_h, int) or self.gap_h < 0:
            raise ValueError(f"DriftRule.gap_h must be a whole number >= 0, got {self.gap_h!r}")
        if self.min_baseline_h > self.baseline_h:
            raise ValueError("DriftRule.min_baseline_h cannot exceed baseline_h")


@dataclass(frozen=True, slots=True)
class NetworkDevice:
    """One device's hourly means of one metric on the network's hour grid (NaN: none)."""

    device_id: str
    lat: float | None
    lon: float | None
    values: NDArray[np.float64]
    reference: bool = False  # a reference station (registry kind 'import')


@dataclass(frozen=True, slots=True)
class Network:
    """Hourly means of one metric for every device, on one grid of hours."""

    metric: str
    start_ms: int  # start of the first hour, epoch ms
    devices: tuple[NetworkDevice, ...]

    def __post_init__(self) -> None:
        if self.metric not in METRIC_FLOOR:
            raise ValueError(f"drift detection covers {', '.join(METRICS)}; not {self.metric!r}")
        lengths = {len(d.values) for d in self.devices}
        if len(lengths) > 1:
            raise ValueError("every device's hourly values must cover the same hours")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("a device appears twice in the network")

    @property
    def hours(self) -> int:
        return len(self.devices[0].values) if self.devices else 0

    def hour_ms(self, index: int) -> int:
        return self.start_ms + index * HOUR_MS


@dataclass(frozen=True, slots=True)
class Neighbour:
    device_id: str
    distance_km: float
    reference: bool
    median_ratio: float  # the device's hourly mean over this neighbour's, alarm hours

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "distance_km": round(self.distance_km, 3),
            "reference": self.reference,
            "ratio_during_alarm": round(self.median_ratio, 3),
        }


@dataclass(frozen=True, slots=True)
class DriftAlarm:
    """A run of alarm hours on one device and metric, with its evidence."""

    device_id: str
    metric: str
    start_hour: int  # index of the first alarm hour on the network's grid
    end_hour: int  # index after the last alarm hour
    since_hour: int  # first hour of the growing departure that led to the alarm
    start_ms: int
    end_ms: int
    since_ms: int
    direction: str  # "up" or "down"
    departure: float  # peak smoothed departure, as a factor (x1.8 = 1.8, /2 = 0.5)
    tolerance: float  # the tolerance at the alarm's start, as a factor
    baseline_ratio: float  # the device over its neighbours' median before the drift
    neighbours: tuple[Neighbour, ...] = field(default_factory=tuple)
    references_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "metric": self.metric,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "since_ms": self.since_ms,
            "direction": self.direction,
            "departure_factor": round(self.departure, 3),
            "tolerance_factor": round(self.tolerance, 3),
            "baseline_ratio": round(self.baseline_ratio, 3),
            "neighbours": [n.to_dict() for n in self.neighbours],
        }


@dataclass(frozen=True, slots=True)
class Detection:
    """The detector's per-hour state for every device (rows follow ``network.devices``)."""

    ratio: NDArray[np.float64]  # r_i(t), log
    baseline: NDArray[np.float64]  # baseline of r_i at t, log
    spread: NDArray[np.float64]  # 1.4826 * MAD of the baseline hours
    departure: NDArray[np.float64]  # smoothed d_i(t)
    tolerance: NDArray[np.float64]
    alarm: NDArray[np.bool_]
    neighbour_median: NDArray[np.float64]  # m_i(t)
    neighbours: list[NDArray[np.int64]]
    judged: NDArray[np.bool_]  # hours where the detector could judge the device


def _nan_quiet(func: Any, *args: Any, **kwargs: Any) -> Any:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(*args, **kwargs)


def _window_stats(
    series: NDArray[np.float64], rule: DriftRule
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Median and 1.4826 * MAD of ``series`` over each hour's baseline window: the
    ``baseline_h`` hours ending ``gap_h`` hours before it (NaN with too few values)."""
    n, width = len(series), rule.baseline_h
    padded = np.concatenate([np.full(width + rule.gap_h, np.nan), series])[: n + width]
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)[:n]
    count = np.sum(~np.isnan(windows), axis=1)
    median = _nan_quiet(np.nanmedian, windows, axis=1)
    spread = 1.4826 * _nan_quiet(np.nanmedian, np.abs(windows - median[:, None]), axis=1)
    few = count < rule.min_baseline_h
    median[few] = np.nan
    spread[few] = np.nan
    return median, spread


def _causal_median(series: NDArray[np.float64], width: int) -> NDArray[np.float64]:
    if width <= 1:
        return series.copy()
    padded = np.concatenate([np.full(width - 1, np.nan), series])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    out: NDArray[np.float64] = _nan_quiet(np.nanmedian, windows, axis=1)
    out[np.isnan(series)] = np.nan
    return out


def _persistent(hot: NDArray[np.bool_], hours: int) -> NDArray[np.bool_]:
    """Hours at or after the ``hours``-th consecutive hot hour of a run."""
    run = np.zeros(len(hot), dtype=np.int64)
    for t in range(len(hot)):
        run[t] = (run[t - 1] + 1 if t else 1) if hot[t] else 0
    out: NDArray[np.bool_] = run >= hours
    return out


def _pass(
    table: NDArray[np.float64],
    near: NDArray[np.int64],
    i: int,
    exclude: NDArray[np.bool_] | None,
    floor: float,
    rule: DriftRule,
) -> tuple[NDArray[np.float64], ...]:
    """One device's neighbour median, ratio, baseline, spread and smoothed departure;
    ``exclude`` marks (device, hour) cells left out of the median."""
    rows = table[near]
    if exclude is not None:
        rows = np.where(exclude[near], np.nan, rows)
    present = np.sum(~np.isnan(rows), axis=0)
    m = _nan_quiet(np.nanmedian, rows, axis=0)
    m[present < rule.min_neighbours] = np.nan
    r = np.log(table[i] + floor) - np.log(m + floor)
    base, spread = _window_stats(r, rule)
    d = _causal_median(r - base, rule.smooth_h)
    return m, r, base, spread, d


def _judge(
    table: NDArray[np.float64],
    neighbours: list[NDArray[np.int64]],
    exclude: NDArray[np.bool_] | None,
    own: NDArray[np.float64],
    floor: float,
    rule: DriftRule,
) -> dict[str, NDArray[np.float64]]:
    """Every device's state against its neighbours (minus ``exclude``), its alarm hours
    after blaming: where two neighbours depart in opposite directions, the one whose
    own level moved less in its direction is not alarmed."""
    n, hours = table.shape
    out = {name: np.full((n, hours), np.nan) for name in ("m", "r", "b", "s", "d", "tol")}
    for i in range(n):
        if neighbours[i].size == 0:
            continue
        m, r, b, spread, d = _pass(table, neighbours[i], i, exclude, floor, rule)
        out["m"][i], out["r"][i], out["b"][i], out["s"][i], out["d"][i] = m, r, b, spread, d
        out["tol"][i] = np.maximum(rule.tol_floor, rule.k * spread)
    judged = ~np.isnan(out["d"]) & ~np.isnan(out["tol"])
    hot = judged & (np.abs(np.nan_to_num(out["d"])) > np.nan_to_num(out["tol"], nan=np.inf))
    sign = np.sign(np.nan_to_num(out["d"]))
    score = sign * np.nan_to_num(own)
    blamed = hot.copy()
    for i in range(n):
        for j in neighbours[i]:
            blamed[i] &= ~(hot[j] & (sign[j] == -sign[i]) & (score[j] > score[i]))
    alarm = np.zeros((n, hours), dtype=bool)
    for i in range(n):
        alarm[i] = _persistent(blamed[i], rule.persist_h)
    out["judged"] = judged.astype(np.float64)
    out["alarm"] = alarm.astype(np.float64)
    return out


def analyse(network: Network, rule: DriftRule | None = None) -> Detection:
    """The detector's per-hour state for every device of ``network``.

    Two passes. Both blame, where two neighbours depart in opposite directions, the one
    whose own level moved more in its direction against its own baseline (a drift
    moves one device; a city-wide change moves both). The second leaves every device
    the first alarmed on out of its neighbours' medians from its alarm on: a drifting
    device must not drag its neighbours' reference with it (a device whose only
    neighbours are all under suspicion is not judged).
    """
    rule = rule or DriftRule()
    n, hours = len(network.devices), network.hours
    floor = METRIC_FLOOR[network.metric]
    table = np.stack([d.values for d in network.devices]) if n else np.zeros((0, hours))
    table = np.where(table < 0, 0.0, table)  # a negative hourly mean is a broken sensor's
    dist = distances_km(network.devices) if n else np.zeros((0, 0))
    neighbours: list[NDArray[np.int64]] = []
    for i in range(n):
        near = np.flatnonzero(dist[i] <= rule.radius_km)
        neighbours.append(near[near != i])
    own = _own_departure(table, floor, rule)
    first = _judge(table, neighbours, None, own, floor, rule)
    suspect = np.cumsum(first["alarm"] > 0, axis=1) > 0
    out = _judge(table, neighbours, suspect, own, floor, rule)
    return Detection(
        out["r"],
        out["b"],
        out["s"],
        out["d"],
        out["tol"],
        out["alarm"] > 0,
        out["m"],
        neighbours,
        out["judged"] > 0,
    )


def _own_departure(
    table: NDArray[np.float64], floor: float, rule: DriftRule
) -> NDArray[np.float64]:
    """Each device's smoothed log level against its own baseline level."""
    level = np.log(table + floor)
    out = np.full(table.shape, np.nan)
    for i in range(table.shape[0]):
        base, _ = _window_stats(level[i], rule)
        out[i] = _causal_median(level[i] - base, rule.smooth_h)
    return out


def _runs(mask: NDArray[np.bool_], merge_h: int = 0) -> list[tuple[int, int]]:
    """Runs of True as (start, end); runs at most ``merge_h`` hours apart are one."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs: list[tuple[int, int]] = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if runs and a - runs[-1][1] <= merge_h:
            runs[-1] = (runs[-1][0], int(b))
        else:
            runs.append((int(a), int(b)))
    return runs


def _since(det: Detection, i: int, start: int) -> int:
    """Walk back from the alarm's start while the departure (over 3 h, not the alarm's
    long smoothing) keeps the alarm's sign and is at least a quarter of the tolerance:
    the first hour of the drift the data shows."""
    tol = det.tolerance[i]
    sign = np.sign(det.departure[i, start])
    d = _causal_median(det.ratio[i] - det.baseline[i], 3)  # the departure, barely smoothed
    t = start
    while t > 0 and not np.isnan(d[t - 1]) and np.sign(d[t - 1]) == sign:
        if abs(d[t - 1]) < 0.25 * float(np.nan_to_num(tol[t - 1], nan=tol[start])):
            break
        t -= 1
    return t


def detect_drift(network: Network, rule: DriftRule | None = None) -> list[DriftAlarm]:
    """Every drift alarm in ``network``, oldest first, with its evidence."""
    rule = rule or DriftRule()
    det = analyse(network, rule)
    dist = distances_km(network.devices) if network.devices else np.zeros((0, 0))
    alarms: list[DriftAlarm] = []
    floor = METRIC_FLOOR[network.metric]
    for i, device in enumerate(network.devices):
        for start, end in _runs(det.alarm[i], rule.merge_h):
            span = det.departure[i, start:end]
            peak = int(np.nanargmax(np.abs(span)))
            since = _since(det, i, start)
            near = det.neighbours[i]
            evidence = []
            for j in near:
                own = network.devices[i].values[start:end] + floor
                other = network.devices[j].values[start:end] + floor
                ratios = _nan_quiet(np.nanmedian, own / other)
                evidence.append(
                    Neighbour(
                        network.devices[j].device_id,
                        float(dist[i, j]),
                        network.devices[j].reference,
                        float(ratios),
                    )
                )
            evidence.sort(key=lambda nb: (nb.distance_km, nb.device_id))
            alarms.append(
                DriftAlarm(
                    device_id=device.device_id,
                    metric=network.metric,
                    start_hour=start,
                    end_hour=end,
                    since_hour=since,
                    start_ms=network.hour_ms(start),
                    end_ms=network.hour_ms(end),
                    since_ms=network.hour_ms(since),
                    direction="up" if span[peak] > 0 else "down",
                    departure=float(math.exp(span[peak])),
                    tolerance=float(math.exp(det.tolerance[i, start])),
                    baseline_ratio=float(math.exp(det.baseline[i, since])),
                    neighbours=tuple(evidence),
                    references_only=bool(near.size)
                    and all(network.devices[j].reference for j in near),
                )
            )
    alarms.sort(key=lambda a: (a.start_ms, a.device_id))
    return alarms


@dataclass(frozen=True, slots=True)
class Correction:
    """Hour by hour from the alarm's start: the correction the network estimates for a
    drifting device against its neighbours' median, with the gain and baseline frozen at
    the hour the drift began (``since``)."""

    device_id: str
    metric: str
    start_hour: int
    offset: NDArray[np.float64]  # subtract from the reading (additive drift)
    factor: NDArray[np.float64]  # multiply the reading by (multiplicative drift)
    expected: NDArray[np.float64]  # what the neighbours say the device should read

    def corrected(self, values: NDArray[np.float64], kind: str = "offset") -> NDArray[np.float64]:
        """``values`` (the device's hourly means from ``start_hour``) corrected."""
        n = len(self.offset)
        if kind == "offset":
            out: NDArray[np.float64] = values[:n] - self.offset
        elif kind == "factor":
            out = values[:n] * self.factor
        else:
            raise ValueError(f"correction kind is 'offset' or 'factor', not {kind!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        last = _last_finite(self.offset)
        return {
            "offset": None if last is None else round(last, 3),
            "factor": None
            if _last_finite(self.factor) is None
            else round(float(_last_finite(self.factor) or 0.0), 4),
        }


def _last_finite(series: NDArray[np.float64]) -> float | None:
    finite = np.flatnonzero(np.isfinite(series))
    return float(series[finite[-1]]) if finite.size else None


def correction_for(
    network: Network,
    alarm: DriftAlarm,
    rule: DriftRule | None = None,
    detection: Detection | None = None,
) -> Correction:
    """The correction of ``alarm``'s device from the alarm's start to the grid's end.

    The device's relation to its neighbours before the drift, ``x + c = g * (m + c)``
    with ``g`` its baseline ratio at ``since``, gives the expected reading from the
    neighbours' median each hour; the residual's median over the last ``correction_h``
    hours is the offset estimate, and expected over actual (the same window) the factor.
    """
    rule = rule or DriftRule()
    det = detection or analyse(network, rule)
    i = next((k for k, d in enumerate(network.devices) if d.device_id == alarm.device_id), None)
    if i is None:
        raise ValueError(f"device {alarm.device_id!r} is not in the network")
    floor = METRIC_FLOOR[network.metric]
    gain = float(np.exp(det.baseline[i, alarm.since_hour]))
    if not math.isfinite(gain):
        gain = alarm.baseline_ratio
    lo = max(0, alarm.start_hour - rule.correction_h)  # the hours just before count too
    skip = alarm.start_hour - lo
    x = network.devices[i].values[lo:]
    expected = gain * (det.neighbour_median[i, lo:] + floor) - floor
    residual = x - expected
    with np.errstate(all="ignore"):
        log_quotient = np.log(expected + floor) - np.log(x + floor)
    offset = _trailing_median(residual, rule.correction_h)[skip:]
    factor = np.exp(_trailing_median(log_quotient, rule.correction_h))[skip:]
    return Correction(
        alarm.device_id, network.metric, alarm.start_hour, offset, factor, expected[skip:]
    )


def _trailing_median(series: NDArray[np.float64], width: int) -> NDArray[np.float64]:
    """Median of the last ``width`` finite values BEFORE each hour (carried over gaps):
    the correction applied to an hour is estimated from earlier hours only."""
    out = np.full(len(series), np.nan)
    recent: list[float] = []
    for t, value in enumerate(series):
        if recent:
            out[t] = float(np.median(recent))
        if math.isfinite(value):
            recent.append(float(value))
            recent = recent[-width:]
    return out
