"""Windowing: raw samples -> one reading per metric and epoch-aligned window.

The reading's time is the window start, its value the mean of the window's samples.
Raw channels (:data:`civicmesh.metrics.RAW_CHANNELS`) are windowed the same way but
become no readings: :meth:`Windower.take_raw` hands their means to the models.
A window is emitted once the driver's horizon has passed its end, so the result does
not depend on how the samples were split over ``feed`` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from civicmesh.drivers import SampleBlock
from civicmesh.metrics import BY_NAME, RAW_CHANNELS, Quality
from civicmesh.protocol import Reading


class Windower:
    def __init__(self, window_ms: int, expected_samples: int, *, simulated: bool = False) -> None:
        if window_ms <= 0 or expected_samples <= 0:
            raise ValueError("window_ms and expected_samples must be positive")
        self.window_ms = window_ms
        self.expected_samples = expected_samples
        self.base_flags = int(Quality.SIMULATED) if simulated else 0
        self._held: dict[str, tuple[NDArray[np.int64], NDArray[np.float64]]] = {}
        self._raw: dict[int, dict[str, float]] = {}

    def feed(self, blocks: Iterable[SampleBlock], until_ms: int) -> list[Reading]:
        """Add samples; return readings of every window that ends at or before ``until_ms``."""
        for block in blocks:
            times = np.asarray(block.times_ms, dtype=np.int64)
            values = np.asarray(block.values, dtype=np.float64)
            held = self._held.get(block.metric)
            if held is not None:
                times = np.concatenate([held[0], times])
                values = np.concatenate([held[1], values])
            self._held[block.metric] = (times, values)
        cutoff = (until_ms // self.window_ms) * self.window_ms
        readings: list[Reading] = []
        for metric, (times, values) in list(self._held.items()):
            done = times < cutoff
            if not done.any():
                continue
            self._held[metric] = (times[~done], values[~done])
            if metric in RAW_CHANNELS:
                self._raw_windows(metric, times[done], values[done])
            else:
                readings.extend(self._window(metric, times[done], values[done]))
        readings.sort(key=lambda r: (r.ts_ms, BY_NAME[r.metric].code))
        return flag_implausible(readings)

    def take_raw(self) -> dict[int, dict[str, float]]:
        """Window start -> raw channel means, for the windows completed so far."""
        raw, self._raw = self._raw, {}
        return raw

    def _raw_windows(
        self, channel: str, times: NDArray[np.int64], values: NDArray[np.float64]
    ) -> None:
        starts = (times // self.window_ms) * self.window_ms
        keys, inverse = np.unique(starts, return_inverse=True)
        means = np.bincount(inverse, weights=values) / np.bincount(inverse)
        for start, mean in zip(keys.tolist(), means.tolist(), strict=True):
            self._raw.setdefault(int(start), {})[channel] = float(mean)

    def _window(
        self, metric: str, times: NDArray[np.int64], values: NDArray[np.float64]
    ) -> list[Reading]:
        starts = (times // self.window_ms) * self.window_ms
        keys, inverse = np.unique(starts, return_inverse=True)
        counts = np.bincount(inverse)
        means = np.bincount(inverse, weights=values) / counts
        info = BY_NAME[metric]
        out = []
        for start, count, mean in zip(keys.tolist(), counts.tolist(), means.tolist(), strict=True):
            flags = self.base_flags
            if count < self.expected_samples:
                flags |= Quality.PARTIAL_WINDOW
            if not info.plausible(mean):
                flags |= Quality.OUT_OF_RANGE
            out.append(Reading(int(start), metric, float(mean), int(flags)))
        return out


# (a, b, test): readings of a and b in one window that cannot both be right.
IMPLAUSIBLE_PAIRS: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
    # PM2.5 is part of PM10; optical sensors report both from one count (10% + 1 µg/m³ slack)
    ("pm25", "pm10", lambda pm25, pm10: pm25 > 1.1 * pm10 + 1.0),
    # Not "a speed without vehicles": traffic systems report a speed from travel times
    # when nothing was counted (every such window of the Aarhus data set has one).
)


def flag_implausible(readings: list[Reading]) -> list[Reading]:
    """Flag both readings of a physically impossible combination in one window."""
    by_key = {(r.ts_ms, r.metric): i for i, r in enumerate(readings)}
    for (ts, metric), i in list(by_key.items()):
        for a, b, impossible in IMPLAUSIBLE_PAIRS:
            j = by_key.get((ts, b)) if metric == a else None
            if j is not None and impossible(readings[i].value, readings[j].value):
                for k in (i, j):
                    flags = readings[k].quality | Quality.IMPLAUSIBLE
                    readings[k] = replace(readings[k], quality=int(flags))
    return readings
