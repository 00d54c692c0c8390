"""The simulated sensor driver: civicmesh's SensorDriver over the signal models.

Samples lie on an epoch-aligned grid (``t = k * sample_interval_ms``). ``read(until_ms)``
computes every grid sample in ``[cursor, until_ms)`` and moves the cursor, so an
accelerated clock replays a week in one call, and any chunking of the reads returns the
same samples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from civicmesh.drivers import SampleBlock
from firmware_sim.errors import InvalidSpecError, SimulationError
from firmware_sim.faults import Fault, apply_faults, parse_faults
from firmware_sim.signals import ALL_METRICS, SignalParams, simulate

log = logging.getLogger(__name__)

AIR_METRICS: tuple[str, ...] = (
    "pm25",
    "pm10",
    "no2",
    "o3",
    "co",
    "temperature",
    "relativehumidity",
)
TRAFFIC_METRICS: tuple[str, ...] = ("vehicle_count", "mean_speed", "occupancy")
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "air": AIR_METRICS,
    "traffic": TRAFFIC_METRICS,
    "multi": ALL_METRICS,
}
# Keys of a zone profile (see firmware_sim.city.SimZone.profile); "name" is informative.
PROFILE_KEYS: frozenset[str] = frozenset(
    {
        "name",
        "traffic_intensity",
        "background_level",
        "free_speed_kmh",
        "lanes",
        "weather_seed",
        "utc_offset_min",
    }
)
# Bound the arrays of one computation; a long catch-up read is computed in pieces.
_MAX_SAMPLES_PER_PIECE = 100_000


def sample_block(metric: str, times: NDArray[np.int64], values: NDArray[np.float64]) -> SampleBlock:
    """A SampleBlock over NumPy arrays (documented as valid; its annotation says Sequence)."""
    return SampleBlock(metric, cast("Sequence[int]", times), cast("Sequence[float]", values))


def _ceil_to_grid(t_ms: int, interval_ms: int) -> int:
    return -(-t_ms // interval_ms) * interval_ms


def signal_params(
    seed: int, zone_profile: Mapping[str, Any] | None, sample_interval_ms: int
) -> SignalParams:
    """Signal parameters from a driver's seed and zone profile (validated)."""
    profile = dict(zone_profile or {})
    unknown = sorted(set(profile) - PROFILE_KEYS)
    if unknown:
        raise InvalidSpecError(
            f"Invalid zone_profile: unknown key {unknown[0]!r}; "
            f"known keys: {', '.join(sorted(PROFILE_KEYS))}"
        )
    profile.pop("name", None)
    profile.setdefault("weather_seed", seed)
    for key in ("lanes", "weather_seed", "utc_offset_min"):
        if key in profile and (isinstance(profile[key], bool) or not isinstance(profile[key], int)):
            raise InvalidSpecError(f"Invalid zone_profile: {key} must be an integer")
    for key in ("traffic_intensity", "background_level", "free_speed_kmh"):
        value = profile.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidSpecError(f"Invalid zone_profile: {key} must be a number")
    return SignalParams(seed=seed, sample_interval_ms=sample_interval_ms, **profile)


class SimulatedDriver:
    """A virtual multi-sensor (air, traffic or both) of the simulated city."""

    def __init__(
        self,
        seed: int,
        zone_profile: dict[str, Any] | None = None,
        kind: str = "multi",
        sample_interval_ms: int = 20_000,
        start_ms: int | None = None,
        faults: list[dict[str, Any]] | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidSpecError(f"Invalid seed {seed!r}: must be an integer")
        if kind not in METRICS_BY_KIND:
            raise InvalidSpecError(
                f"Invalid kind {kind!r}: use one of {', '.join(sorted(METRICS_BY_KIND))}"
            )
        if isinstance(sample_interval_ms, bool) or not isinstance(sample_interval_ms, int):
            raise InvalidSpecError("Invalid sample_interval_ms: must be an integer")
        if start_ms is not None and (isinstance(start_ms, bool) or not isinstance(start_ms, int)):
            raise InvalidSpecError("Invalid start_ms: must be an integer (epoch ms) or absent")
        self._seed = seed
        self._kind = kind
        self._metrics = METRICS_BY_KIND[kind]
        self._params = signal_params(seed, zone_profile, sample_interval_ms)
        self._interval = sample_interval_ms
        self._cursor = None if start_ms is None else _ceil_to_grid(start_ms, sample_interval_ms)
        parsed = parse_faults(faults)
        for fault in parsed:
            if fault.metric != "*" and fault.metric not in self._metrics:
                raise InvalidSpecError(
                    f"Invalid fault: a {kind!r} device does not measure {fault.metric!r}; "
                    f"its metrics: {', '.join(self._metrics)}"
                )
        self._faults = {metric: self._pin_stuck(metric, parsed) for metric in self._metrics}
        self._closed = False
        self.dropped_samples = 0  # removed by dropout faults, for health reporting

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def sample_interval_ms(self) -> int:
        return self._interval

    @property
    def kind(self) -> str:
        return self._kind

    def _pin_stuck(self, metric: str, faults: Sequence[Fault]) -> tuple[Fault, ...]:
        """Fix each stuck fault's held value to the value at its first grid sample.

        Without this, the held value would be the first one of whichever read first
        touched the window, and chunked reads would differ from one long read.
        """
        pinned: list[Fault] = []
        for fault in faults:
            if fault.kind == "stuck" and fault.hold_value is None and fault.applies_to(metric):
                first = _ceil_to_grid(fault.start_ms, self._interval)
                t = np.array([first], dtype=np.int64)
                clean = simulate(self._params, t, (metric,))[metric]
                _, held = apply_faults(metric, t, clean, pinned, self._seed, remove_dropouts=False)
                pinned.append(dataclasses.replace(fault, hold_value=float(held[0])))
            else:
                pinned.append(fault)
        return tuple(pinned)

    def read(self, until_ms: int) -> list[SampleBlock]:
        """All grid samples in ``[cursor, until_ms)``, one block per metric with samples."""
        if self._closed:
            raise SimulationError("Simulated driver is closed: create a new one to read again")
        if self._cursor is None:
            self._cursor = _ceil_to_grid(until_ms - self._interval, self._interval)
        if until_ms <= self._cursor:
            return []
        count = -(-(until_ms - self._cursor) // self._interval)
        times = self._cursor + np.arange(count, dtype=np.int64) * self._interval
        self._cursor += count * self._interval
        pieces = [
            self._compute(times[i : i + _MAX_SAMPLES_PER_PIECE])
            for i in range(0, count, _MAX_SAMPLES_PER_PIECE)
        ]
        blocks: list[SampleBlock] = []
        for metric in self._metrics:
            block_times = np.concatenate([piece[metric][0] for piece in pieces])
            block_values = np.concatenate([piece[metric][1] for piece in pieces])
            if block_times.size:
                blocks.append(sample_block(metric, block_times, block_values))
        return blocks

    def _compute(self, times: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        values = simulate(self._params, times, self._metrics)
        result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for metric in self._metrics:
            faults = self._faults[metric]
            if any(fault.applies_to(metric) for fault in faults):
                t, v = apply_faults(metric, times, values[metric], faults, self._seed)
                dropped = times.size - t.size
                if dropped:
                    self.dropped_samples += dropped
                    log.info("simulated dropout: %d %s samples not produced", dropped, metric)
                result[metric] = (t, v)
            else:
                result[metric] = (times, values[metric])
        return result

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"SimulatedDriver(seed={self._seed}, kind={self._kind!r}, interval={self._interval})"
