"""On-device features of the calibration and fault models (numpy only).

Training (``training/``) and the edge runtime call this same code, so a model sees the
same numbers in the field as it saw in training. Every extractor is causal: a window's
features use that window and earlier ones only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.typing import NDArray

from civicmesh.metrics import BY_NAME

# The fault model's classes, in output order. "ok" first: anomaly score = 1 - p(ok).
FAULT_CLASSES: tuple[str, ...] = ("ok", "stuck", "spike", "drift", "dropout", "out_of_range")

FAULT_FEATURES: tuple[str, ...] = (
    "gap",  # log1p of the missing sample intervals before this sample
    "run",  # log1p of how many previous samples repeat this value exactly
    "flat",  # fraction of the history equal to this value
    "spread",  # log1p of the history's spread relative to the metric's scale
    "z_median",  # signed log1p of the robust distance from the history's median
    "z_step",  # signed log1p of the step from the previous sample, in typical steps
    "outside",  # 1 when the value is outside the metric's plausible range
    "outside_by",  # signed log1p of the distance beyond the range, in scales
    "level_dev",  # fast minus slow average of the log level
    "ratio_dev",  # fast minus slow average of the log ratio to the partner channel
    "ratio_now",  # this sample's log ratio minus its slow average
    "ratio_z",  # ratio_dev in units of the ratio's sample-to-sample noise
    "ratio_mid",  # a 4-hour average of the log ratio minus its slow average
    "resid_fast",  # fast average of the value minus what partner x slow ratio predicts
    "wiggle_fast",  # log of the typical-step ratio to the partner minus the fast log ratio
    "wiggle_dev",  # wiggle_fast minus its slow average
    "wiggle_mid",  # a 4-hour average of wiggle_fast minus its slow average
    "fine_above",  # 1 when the pair's PM2.5 exceeds its PM10 (PM2.5 is part of PM10)
    "fine_above_1h",  # fine_above averaged over the last hour
    "fine_above_by",  # log1p of that excess, in the metric's scales
    "has_partner",  # 1 when a partner channel (pm25 <-> pm10) is present
    "kind_air",
    "kind_weather",
    "kind_traffic",
)

_GAP = FAULT_FEATURES.index("gap")
_OUTSIDE = FAULT_FEATURES.index("outside")

# Partner channels measured by the same instrument: their ratio is stable, so a change
# in it shows one channel drifting (a single channel's slow drift looks like weather).
PARTNERS: dict[str, str] = {"pm25": "pm10", "pm10": "pm25"}

# (resolution, scale) per metric: the smallest step a sensor reports, and a typical
# variation used to make features comparable across metrics.
_SCALES: dict[str, tuple[float, float]] = {
    "pm25": (0.1, 5.0),
    "pm10": (0.1, 8.0),
    "no2": (1.0, 10.0),
    "o3": (1.0, 10.0),
    "co": (0.01, 0.3),
    "temperature": (0.1, 1.0),
    "relativehumidity": (0.1, 5.0),
    "vehicle_count": (1.0, 5.0),
    "mean_speed": (1.0, 10.0),
    "occupancy": (0.1, 5.0),
}

HOUR_MS = 3_600_000


def metric_scale(metric: str) -> tuple[float, float]:
    """(resolution, scale) of ``metric``: what the features divide by. Training uses the
    same pair, so a model learns on exactly the features the device computes."""
    return _SCALES.get(metric, (0.1, 1.0))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def _slog(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


@dataclass
class _Ewma:
    tau_ms: float
    value: float | None = None
    t_ms: int | None = None

    def update(self, t_ms: int, x: float) -> float:
        if self.value is None or self.t_ms is None:
            self.value = x
        else:
            alpha = 1.0 - math.exp(-max(t_ms - self.t_ms, 0) / self.tau_ms)
            self.value += alpha * (x - self.value)
        self.t_ms = t_ms
        return self.value


class StreamFeatures:
    """Causal fault features of one sensor stream, one sample (or window) at a time."""

    def __init__(
        self,
        metric: str,
        interval_ms: int,
        history: int = 12,
        fast_tau_ms: int = HOUR_MS,
        slow_tau_ms: int = 24 * HOUR_MS,
    ) -> None:
        if metric not in BY_NAME:
            raise ValueError(f"Unknown metric {metric!r}")
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.metric = metric
        self.info = BY_NAME[metric]
        self.interval_ms = interval_ms
        self.resolution, self.scale = metric_scale(metric)
        self._history: deque[float] = deque(maxlen=history)
        self._last_t: int | None = None
        self._level = (_Ewma(fast_tau_ms), _Ewma(slow_tau_ms))
        self._ratio = (_Ewma(fast_tau_ms), _Ewma(slow_tau_ms))
        self._ratio_noise = _Ewma(slow_tau_ms)
        self._ratio_mid = _Ewma(4 * HOUR_MS)
        self._resid = _Ewma(fast_tau_ms)
        self._steps = (_Ewma(fast_tau_ms), _Ewma(fast_tau_ms))
        self._wiggle = (_Ewma(slow_tau_ms), _Ewma(4 * HOUR_MS))
        self._fine_above = _Ewma(fast_tau_ms)
        self._is_fine = {"pm25": True, "pm10": False}.get(metric)  # None: no PM pair
        self._last_pair: tuple[float, float] | None = None
        self._pairs_since = 0  # when the first pair came (set with it)
        self._warm_up_ms = fast_tau_ms
        self._last_ratio: float | None = None
        kind = self.info.kind
        self._kind = (float(kind == "air"), float(kind == "weather"), float(kind == "traffic"))

    def update(self, t_ms: int, value: float, partner: float | None = None) -> NDArray[np.float32]:
        """The features of this sample; then the sample joins the history."""
        gap = 0.0
        if self._last_t is not None:
            gap = max((t_ms - self._last_t) / self.interval_ms - 1.5, 0.0)
        # pure Python: on a dozen values it is several times faster than numpy
        hist = list(self._history)
        res = self.resolution
        run = 0
        for previous in reversed(hist):
            if abs(previous - value) > 1e-9:
                break
            run += 1
        if len(hist) >= 2:
            median = _median(hist)
            mad = _median([abs(x - median) for x in hist]) * 1.4826
            typical_step = _median([abs(b - a) for a, b in pairwise(hist)]) * 1.4826
            flat = sum(1 for x in hist if abs(x - value) <= 1e-9) / len(hist)
            mean = sum(hist) / len(hist)
            std = math.sqrt(sum((x - mean) ** 2 for x in hist) / len(hist))
            spread = math.log1p(std / self.scale)
            z_median = _slog((value - median) / (mad + res))
            z_step = _slog((value - hist[-1]) / (typical_step + res))
        else:
            flat = spread = z_median = z_step = 0.0
        lo, hi = self.info.minimum, self.info.maximum
        outside = 0.0 if lo <= value <= hi else 1.0
        beyond = value - hi if value > hi else (value - lo if value < lo else 0.0)
        level = math.log1p(max(value, 0.0) / self.scale)
        fast, slow = (e.update(t_ms, level) for e in self._level)
        level_dev = fast - slow
        ratio_dev, ratio_now, ratio_z, has_partner = 0.0, 0.0, 0.0, 0.0
        ratio_mid = resid_fast = wiggle_fast = wiggle_dev = wiggle_mid = 0.0
        fine_above = fine_above_1h = fine_above_by = 0.0
        if partner is not None and math.isfinite(partner):
            has_partner = 1.0
            ratio = math.log((max(value, 0.0) + 1.0) / (max(partner, 0.0) + 1.0))
            # a drift adds an offset: it shows as a residual against what the partner
            # and the usual ratio predict, whatever the concentration
            usual = self._ratio[1].value
            expected = (max(partner, 0.0) + 1.0) * math.exp(ratio if usual is None else usual)
            resid_fast = self._resid.update(t_ms, (max(value, 0.0) + 1.0 - expected) / self.scale)
            rfast, rslow = (e.update(t_ms, ratio) for e in self._ratio)
            ratio_dev = rfast - rslow
            ratio_mid = self._ratio_mid.update(t_ms, ratio) - rslow
            ratio_now = ratio - rslow
            # noise from successive differences: a slow drift does not inflate it
            step = 0.0 if self._last_ratio is None else ratio - self._last_ratio
            self._last_ratio = ratio
            noise = self._ratio_noise.update(t_ms, step * step / 2.0)
            ratio_z = ratio_dev / math.sqrt(noise + 1e-4)
            # an offset drift adds to the level, not to the sample-to-sample noise: the
            # ratio of typical steps to the partner's stays while the level ratio grows. A
            # real rise of one channel (coarse dust, say) is noisier and moves both alike.
            # (typical steps need an hour of samples first: one step says little)
            if self._last_pair is None:
                self._pairs_since = t_ms
            else:
                last_value, last_partner = self._last_pair
                sv = self._steps[0].update(t_ms, abs(value - last_value))
                sp = self._steps[1].update(t_ms, abs(max(partner, 0.0) - last_partner))
                if t_ms - self._pairs_since >= self._warm_up_ms:
                    wiggle = math.log((sv + res) / (sp + res)) - rfast
                    wslow, wmid = (e.update(t_ms, wiggle) for e in self._wiggle)
                    wiggle_fast, wiggle_dev, wiggle_mid = wiggle, wiggle - wslow, wmid - wslow
            self._last_pair = (value, max(partner, 0.0))
            # PM2.5 counts particles PM10 counts too: a sensor's PM2.5 above its PM10 is
            # impossible (never once in the clean Aberdeen streams), and an offset on the
            # PM2.5 channel shows so early, long before the ratio stands out
            if self._is_fine is not None:
                fine, coarse = (value, partner) if self._is_fine else (partner, value)
                if fine - coarse > res:
                    fine_above, fine_above_by = 1.0, math.log1p((fine - coarse) / self.scale)
                fine_above_1h = self._fine_above.update(t_ms, fine_above)
        self._history.append(value)
        self._last_t = t_ms
        return np.array(
            [
                math.log1p(gap),
                math.log1p(run),
                flat,
                spread,
                z_median,
                z_step,
                outside,
                _slog(beyond / self.scale),
                level_dev,
                ratio_dev,
                ratio_now,
                ratio_z,
                ratio_mid,
                resid_fast,
                wiggle_fast,
                wiggle_dev,
                wiggle_mid,
                fine_above,
                fine_above_1h,
                fine_above_by,
                has_partner,
                *self._kind,
            ],
            dtype=np.float32,
        )


def decide(
    probabilities: NDArray[np.float32], features: NDArray[np.float32], threshold: float
) -> NDArray[np.int64]:
    """Class per row: the plausible-range and gap rules first, then the model: a fault
    class only when p(ok) is below ``threshold`` (chosen in training for few false alarms).
    """
    probabilities = np.asarray(probabilities)
    features = np.asarray(features)
    faults = np.argmax(probabilities[:, 1:], axis=1) + 1
    decided = np.where(probabilities[:, 0] < threshold, faults, 0)
    decided = np.where(features[:, _GAP] > 0, FAULT_CLASSES.index("dropout"), decided)
    decided = np.where(features[:, _OUTSIDE] > 0, FAULT_CLASSES.index("out_of_range"), decided)
    return decided.astype(np.int64)


def stream_features(
    metric: str,
    times_ms: NDArray[np.int64],
    values: NDArray[np.float64],
    interval_ms: int,
    partner: NDArray[np.float64] | None = None,
) -> NDArray[np.float32]:
    """Features of a whole series, row by row, exactly as the runtime computes them."""
    state = StreamFeatures(metric, interval_ms)
    out = np.empty((len(values), len(FAULT_FEATURES)), dtype=np.float32)
    for i, (t, v) in enumerate(zip(times_ms.tolist(), values.tolist(), strict=True)):
        p = None if partner is None else float(partner[i])
        out[i] = state.update(int(t), float(v), p)
    return out


# --- calibration -------------------------------------------------------------------

PM25_FEATURES: tuple[str, ...] = ("pm25_raw", "rh", "temperature", "pm25_x_rh", "log_pm25")


def pm25_features(pm25_raw: float, rh: float, temperature: float) -> NDArray[np.float32]:
    """Inputs of the PM2.5 humidity correction (low-cost optical sensor, CF=1 channel)."""
    pm = max(pm25_raw, 0.0)
    rh = min(max(rh, 0.0), 100.0)
    return np.array(
        [pm, rh, temperature, pm * rh / 100.0, math.log1p(pm)],
        dtype=np.float32,
    )


MOX_CHANNELS: tuple[str, ...] = ("mox_s1", "mox_s2", "mox_s3", "mox_s4", "mox_s5")
GAS_FEATURES: tuple[str, ...] = (
    *(f"log_{c}" for c in MOX_CHANNELS),
    *(f"rel_{c}" for c in MOX_CHANNELS),
    "temperature",
    "rh",
    "abs_humidity",
    "hour_sin",
    "hour_cos",
    "weekend",
)


class GasFeatures:
    """Inputs of the metal-oxide gas calibration (trained on hourly means).

    Metal-oxide resistance follows a power law of concentration, hence the logs; the
    ``rel_`` features subtract the log of the sensor's own running one-week median of
    hourly means, which follows the slow baseline drift these sensors show over months.
    Windows shorter than an hour add to the hour they fall in.
    """

    def __init__(self, baseline_hours: int = 168) -> None:
        self._baseline: list[deque[float]] = [
            deque(maxlen=baseline_hours - 1) for _ in MOX_CHANNELS
        ]
        self._hour: int | None = None
        self._sums = [0.0] * len(MOX_CHANNELS)
        self._count = 0

    def update(
        self,
        t_ms: int,
        mox: tuple[float, ...],
        temperature: float,
        rh: float,
        abs_humidity: float,
    ) -> NDArray[np.float32]:
        if len(mox) != len(MOX_CHANNELS):
            raise ValueError(f"expected {len(MOX_CHANNELS)} metal-oxide channels")
        hour = t_ms // HOUR_MS
        if self._hour is not None and hour != self._hour and self._count:
            for baseline, total in zip(self._baseline, self._sums, strict=True):
                baseline.append(math.log(max(total / self._count, 1.0)))
            self._sums, self._count = [0.0] * len(MOX_CHANNELS), 0
        self._hour = hour
        self._sums = [a + b for a, b in zip(self._sums, mox, strict=True)]
        self._count += 1
        logs = [math.log(max(x, 1.0)) for x in mox]
        rel = [
            log_x - _median([*baseline, log_x])
            for log_x, baseline in zip(logs, self._baseline, strict=True)
        ]
        hour_of_day = hour % 24
        weekday = (t_ms // (24 * HOUR_MS) + 3) % 7  # 1970-01-01 was a Thursday
        angle = 2.0 * math.pi * hour_of_day / 24.0
        return np.array(
            [
                *logs,
                *rel,
                temperature,
                rh,
                abs_humidity,
                math.sin(angle),
                math.cos(angle),
                float(weekday >= 5),
            ],
            dtype=np.float32,
        )
