"""The published accounting rule: one versioned table of thresholds per sensor type.

Anyone who holds the public data and this table recomputes the same scores. A change of
any threshold is a new rule: ``RULE_VERSION`` moves on, and the digest in
:func:`AccountingRule.rule_id` changes with every parameter, so a score always names
the exact rule it was computed under (never changed retroactively).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

RULE_VERSION = "acc-1"


@dataclass(frozen=True, slots=True)
class MetricRule:
    """The checks of one metric: range, stuck and jump."""

    minimum: float  # below: out of range
    maximum: float  # above: out of range
    stuck_s: int  # a run of equal values (within stuck_eps) lasting this long is stuck
    jump: float  # |value - median of its 5-reading neighbourhood| above this is a jump
    stuck_eps: float = 0.0  # values closer than this count as equal
    stuck_exempt: tuple[float, ...] = ()  # held values that are normal (no traffic at night)
    neighbour_floor: float = 0.0  # smallest tolerance of the neighbour check, metric units
    neighbour_rel: float = 0.5  # tolerance as a fraction of the neighbours' median


@dataclass(frozen=True, slots=True)
class SensorTypeRule:
    """What one sensor type (a registry ``kind``) is expected to deliver."""

    interval_s: int  # expected seconds between readings of each metric
    metrics: dict[str, MetricRule] = field(default_factory=dict)


# Per metric, the thresholds shared by every sensor type unless a type overrides them.
# Ranges are tighter than civicmesh.metrics' physical limits: a value a low-cost sensor
# cannot plausibly measure in a city is out of range here.
BASE_METRICS: dict[str, MetricRule] = {
    "pm25": MetricRule(0.0, 1000.0, 2 * 3600, 150.0, neighbour_floor=10.0),
    "pm10": MetricRule(0.0, 1500.0, 2 * 3600, 250.0, neighbour_floor=15.0),
    "no2": MetricRule(0.0, 1000.0, 2 * 3600, 150.0, neighbour_floor=20.0),
    "o3": MetricRule(0.0, 600.0, 2 * 3600, 100.0, neighbour_floor=20.0),
    "co": MetricRule(0.0, 100.0, 2 * 3600, 10.0, neighbour_floor=0.5),
    "temperature": MetricRule(-40.0, 50.0, 3 * 3600, 5.0, neighbour_floor=4.0, neighbour_rel=0.0),
    # 99.9 % is the DHT22's condensation ceiling: a run of it for an hour is a stuck sensor
    "relativehumidity": MetricRule(0.0, 100.0, 3600, 20.0, neighbour_floor=15.0, neighbour_rel=0.0),
    "vehicle_count": MetricRule(
        0.0, 5000.0, 3 * 3600, 400.0, stuck_exempt=(0.0,), neighbour_floor=math.inf
    ),
    "mean_speed": MetricRule(
        0.0, 200.0, 3 * 3600, 80.0, stuck_exempt=(0.0,), neighbour_floor=math.inf
    ),
    "occupancy": MetricRule(
        0.0, 100.0, 3 * 3600, 60.0, stuck_exempt=(0.0,), neighbour_floor=math.inf
    ),
}
# Traffic depends on the road in front of the detector, not on the neighbourhood: an
# infinite floor switches the neighbour check off for those metrics.

# Sensor.Community devices (SDS011 PM, DHT22 / BME280 temperature and humidity) report
# every ~150 s; a DHT22's humidity resolution is 0.1 %, so equal values are common but a
# one-hour run is not.
SENSOR_TYPES: dict[str, SensorTypeRule] = {
    "multi": SensorTypeRule(60, BASE_METRICS),
    "air": SensorTypeRule(60, BASE_METRICS),
    "traffic": SensorTypeRule(60, BASE_METRICS),
    "sds011": SensorTypeRule(150, BASE_METRICS),
    "dht22": SensorTypeRule(150, BASE_METRICS),
    "bme280": SensorTypeRule(150, BASE_METRICS),
}
DEFAULT_SENSOR_TYPE = "multi"


@dataclass(frozen=True, slots=True)
class AccountingRule:
    """Every parameter of the scores; :meth:`rule_id` names them all."""

    version: str = RULE_VERSION
    # completeness: a silence longer than this many intervals is "offline"/"missing"
    gap_intervals: float = 3.0
    # time plausibility: |clock - receive time| above this is a skewed clock
    skew_tolerance_s: int = 300
    # neighbour consistency
    neighbour_radius_km: float = 3.0
    neighbour_min: int = 3  # fewer neighbours with data: no check
    neighbour_mad_k: float = 4.0  # tolerance also >= k * 1.4826 * MAD of the neighbours
    neighbour_remove_offset: bool = True  # compare departures from each device's daily median
    # duplicate streams: correlation of first differences on a 60 s grid, lags +-max
    duplicate_min_corr: float = 0.5
    duplicate_max_lag_s: int = 3600
    duplicate_min_overlap: int = 360
    duplicate_metrics: tuple[str, ...] = ("pm25", "temperature", "vehicle_count")
    # H3 cells: rewarded devices per cell, and per operator in one cell
    h3_resolution: int = 8
    cell_cap: int = 3
    operator_cell_cap: int = 1
    sensor_types: dict[str, SensorTypeRule] = field(default_factory=lambda: dict(SENSOR_TYPES))

    def __post_init__(self) -> None:
        if not 0 <= self.h3_resolution <= 15:
            raise ValueError(
                f"Invalid accounting rule: h3_resolution {self.h3_resolution} must be within 0..15"
            )
        if self.cell_cap < 1 or self.operator_cell_cap < 1:
            raise ValueError("Invalid accounting rule: cell caps must be at least 1")
        if self.neighbour_radius_km <= 0:
            raise ValueError("Invalid accounting rule: neighbour_radius_km must be positive")

    def sensor_type(self, kind: str) -> SensorTypeRule:
        return self.sensor_types.get(kind.lower(), self.sensor_types[DEFAULT_SENSOR_TYPE])

    def metric_rule(self, kind: str, metric: str) -> MetricRule | None:
        return self.sensor_type(kind).metrics.get(metric)

    def rule_id(self) -> str:
        """``<version>+<sha256 of every parameter, 12 hex>``: what a score was computed under."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return f"{self.version}+{hashlib.sha256(text.encode()).hexdigest()[:12]}"
