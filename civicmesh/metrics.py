"""Metric catalogue: OpenAQ-style names, units, wire codes and plausible ranges.

The wire carries the small integer ``code``; everything else uses the ``name``.
Codes are part of protocol version 1: never renumber, only append.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag


@dataclass(frozen=True, slots=True)
class Metric:
    """One measured quantity."""

    code: int
    name: str
    unit: str
    minimum: float
    maximum: float
    kind: str  # "air", "weather" or "traffic"
    description: str

    def plausible(self, value: float) -> bool:
        """True when ``value`` is finite and inside the physically plausible range."""
        return self.minimum <= value <= self.maximum


METRICS: tuple[Metric, ...] = (
    Metric(1, "pm25", "µg/m³", 0.0, 2000.0, "air", "Particulate matter < 2.5 µm"),
    Metric(2, "pm10", "µg/m³", 0.0, 3000.0, "air", "Particulate matter < 10 µm"),
    Metric(3, "no2", "µg/m³", 0.0, 2000.0, "air", "Nitrogen dioxide"),
    Metric(4, "o3", "µg/m³", 0.0, 1000.0, "air", "Ozone"),
    Metric(5, "co", "mg/m³", 0.0, 200.0, "air", "Carbon monoxide"),
    Metric(6, "temperature", "°C", -60.0, 70.0, "weather", "Air temperature"),
    Metric(7, "relativehumidity", "%", 0.0, 100.0, "weather", "Relative humidity"),
    Metric(8, "vehicle_count", "vehicles", 0.0, 10000.0, "traffic", "Vehicles per window"),
    Metric(9, "mean_speed", "km/h", 0.0, 250.0, "traffic", "Mean vehicle speed"),
    Metric(10, "occupancy", "%", 0.0, 100.0, "traffic", "Detector occupancy"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# Raw sensor channels: inputs of on-device models in the sensor's own units (e.g. the
# resistance response of a metal-oxide gas sensor). The agent windows them like metrics
# but never publishes them: a calibration model turns them into a metric.
RAW_CHANNELS: frozenset[str] = frozenset(
    {"mox_s1", "mox_s2", "mox_s3", "mox_s4", "mox_s5", "abs_humidity"}
)
BY_CODE: dict[int, Metric] = {m.code: m for m in METRICS}


def metric(name: str) -> Metric:
    """Look a metric up by name; the error lists the known names."""
    try:
        return BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise ValueError(f"Unknown metric {name!r}; known metrics: {known}") from None


class Quality(IntFlag):
    """Quality flags carried with every reading (bit field on the wire)."""

    OK = 0
    PARTIAL_WINDOW = 1  # fewer samples in the window than expected
    OUT_OF_RANGE = 2  # outside the metric's plausible range
    STUCK = 4  # the sensor repeats one value
    SPIKE = 8  # isolated implausible jump
    DRIFT = 16  # slow departure from the reference
    UNCALIBRATED = 32  # no calibration model applied (missing or broken model)
    MODEL_ERROR = 64  # a model failed on this window
    SIMULATED = 128  # produced by firmware_sim, not real hardware
    GAP = 256  # samples were missing before this window (dropout)
    IMPLAUSIBLE = 512  # contradicts another metric of the same window (PM2.5 > PM10)
