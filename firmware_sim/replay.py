"""Replay of real Sensor.Community archive CSVs as a sensor driver.

Load with ``load_driver("firmware_sim.replay:ReplayDriver", {...})``. The files stay
where they are (never copied into the repository): ``data_dir`` points at a folder of
archive day files named ``YYYY-MM-DD_<type>_sensor_<id>.csv`` (semicolon-separated).
SDS011: P1 is pm10, P2 is pm25 (µg/m³); DHT22/BME280: temperature (°C), humidity (%).
Times are shifted so the earliest replayed sample lands on ``start_ms``.
"""

from __future__ import annotations

import csv
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from civicmesh.drivers import SampleBlock
from civicmesh.metrics import METRICS
from firmware_sim.driver import sample_block
from firmware_sim.errors import InvalidSpecError, SimulationError

log = logging.getLogger(__name__)

# archive column -> civicmesh metric, per sensor type
COLUMNS: dict[str, dict[str, str]] = {
    "sds011": {"P1": "pm10", "P2": "pm25"},
    "dht22": {"temperature": "temperature", "humidity": "relativehumidity"},
    "bme280": {"temperature": "temperature", "humidity": "relativehumidity"},
}


def _parse_time(text: str) -> int:
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)  # the archive writes UTC without an offset
    return int(stamp.timestamp() * 1000)


def load_series(data_dir: Path, sensor_id: int) -> dict[str, tuple[list[int], list[float]]]:
    """All samples of one archive sensor, per metric, in file (time) order."""
    files = sorted(data_dir.glob(f"*_sensor_{sensor_id}.csv"))
    if not files:
        raise InvalidSpecError(f"No archive files for sensor {sensor_id} in {data_dir}")
    series: dict[str, tuple[list[int], list[float]]] = {}
    skipped = 0
    for path in files:
        sensor_type = path.name.split("_")[1].lower()
        columns = COLUMNS.get(sensor_type)
        if columns is None:
            raise InvalidSpecError(f"Unsupported sensor type {sensor_type!r} in {path.name}")
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle, delimiter=";"):
                    try:
                        t = _parse_time(row["timestamp"])
                    except (KeyError, TypeError, ValueError):
                        skipped += 1
                        continue
                    for column, metric in columns.items():
                        text = row.get(column) or ""
                        try:
                            value = float(text)
                        except ValueError:
                            skipped += 1
                            continue
                        times, values = series.setdefault(metric, ([], []))
                        times.append(t)
                        values.append(value)
        except OSError as exc:
            raise SimulationError(f"Cannot read archive file {path}: {exc}") from exc
    if skipped:
        log.warning("replay of sensor %d: %d unreadable values skipped", sensor_id, skipped)
    return series


def read_series(
    series: dict[str, tuple[NDArray[np.int64], NDArray[np.float64]]],
    positions: dict[str, int],
    until_ms: int,
) -> list[SampleBlock]:
    """The samples of each series before ``until_ms`` not returned yet (advances
    ``positions``, in the order of its keys)."""
    blocks = []
    for metric, begin in list(positions.items()):
        times, values = series[metric]
        end = int(np.searchsorted(times, until_ms, side="left"))
        if end > begin:
            blocks.append(sample_block(metric, times[begin:end], values[begin:end]))
            positions[metric] = end
    return blocks


class ReplayDriver:
    """Replays one or more archive sensors (e.g. an SDS011 and its DHT22 neighbour)."""

    def __init__(
        self,
        data_dir: str,
        sensor_ids: list[int],
        start_ms: int | None = None,
        sample_interval_ms: int = 150_000,
    ) -> None:
        if not sensor_ids:
            raise InvalidSpecError("Invalid replay: give at least one sensor id in sensor_ids")
        directory = Path(data_dir)
        if not directory.is_dir():
            raise InvalidSpecError(f"Invalid replay data_dir {data_dir!r}: not a directory")
        merged: dict[str, tuple[list[int], list[float]]] = {}
        for sensor_id in sensor_ids:
            for metric, (times, values) in load_series(directory, int(sensor_id)).items():
                into = merged.setdefault(metric, ([], []))
                into[0].extend(times)
                into[1].extend(values)
        self._series: dict[str, tuple[NDArray[np.int64], NDArray[np.float64]]] = {}
        for metric, (times, values) in merged.items():
            t = np.asarray(times, dtype=np.int64)
            order = np.argsort(t, kind="stable")
            self._series[metric] = (t[order], np.asarray(values, dtype=np.float64)[order])
        first = min(int(t[0]) for t, _ in self._series.values())
        shift = 0 if start_ms is None else start_ms - first
        self._series = {m: (t + shift, v) for m, (t, v) in self._series.items()}
        self._metrics = tuple(m.name for m in METRICS if m.name in self._series)
        self._positions = dict.fromkeys(self._metrics, 0)
        self._interval = sample_interval_ms
        self._closed = False

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def sample_interval_ms(self) -> int:
        return self._interval

    def read(self, until_ms: int) -> list[SampleBlock]:
        if self._closed:
            raise SimulationError("Replay driver is closed")
        return read_series(self._series, self._positions, until_ms)

    def close(self) -> None:
        self._closed = True
