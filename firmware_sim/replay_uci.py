"""Replay of the UCI "Air Quality" recording (De Vito et al.) as a gas-sensor driver.

Load with ``load_driver("firmware_sim.replay_uci:UciReplayDriver", {...})``. The file
stays where it is (``../shared/datasets/uci_air_quality/AirQualityUCI.csv``). The driver
yields what the device itself measured, hourly: the five metal-oxide responses as raw
channels ``mox_s1`` .. ``mox_s5``, temperature, relative humidity and absolute humidity.
The reference analyzer's columns are not the device's and are never replayed; use
:func:`load_uci_file` to read them for evaluation. Hours the device was off (``-200``)
are skipped: they are gaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from civicmesh.drivers import SampleBlock
from firmware_sim.errors import InvalidSpecError, SimulationError
from firmware_sim.replay import read_series

HOUR_MS = 3_600_000
_COLUMNS = (
    "PT08.S1(CO)",
    "PT08.S2(NMHC)",
    "PT08.S3(NOx)",
    "PT08.S4(NO2)",
    "PT08.S5(O3)",
    "T",
    "RH",
    "AH",
    "CO(GT)",
    "NO2(GT)",
)
CHANNELS = (
    "mox_s1",
    "mox_s2",
    "mox_s3",
    "mox_s4",
    "mox_s5",
    "temperature",
    "relativehumidity",
    "abs_humidity",
)


@dataclass(frozen=True)
class UciRecording:
    """The recording as arrays; times are the station's clock read as UTC (no DST)."""

    times_ms: NDArray[np.int64]
    device: NDArray[np.float64]  # (n, 8) in CHANNELS order; NaN where missing
    co: NDArray[np.float64]  # reference CO, mg/m³
    no2: NDArray[np.float64]  # reference NO2, µg/m³


def load_uci_file(path: Path) -> UciRecording:
    """Parse AirQualityUCI.csv (``;``-separated, decimal comma, ``-200`` = missing)."""
    times: list[int] = []
    rows: list[list[float]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline().rstrip("\n").split(";")
            index = {name: i for i, name in enumerate(header) if name}
            columns = [index[name] for name in _COLUMNS]
            for line in handle:
                fields = line.rstrip("\n").split(";")
                if not fields[0]:
                    continue  # the file's trailing all-empty lines
                stamp = datetime.strptime(f"{fields[0]} {fields[1]}", "%d/%m/%Y %H.%M.%S")
                times.append(int(stamp.replace(tzinfo=UTC).timestamp() * 1000))
                rows.append([float(fields[c].replace(",", ".")) for c in columns])
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise SimulationError(f"Cannot read the UCI recording {path}: {exc}") from exc
    data = np.array(rows, dtype=np.float64)
    data[data == -200.0] = np.nan
    return UciRecording(np.array(times, dtype=np.int64), data[:, :8], data[:, 8], data[:, 9])


class UciReplayDriver:
    """Replays the recording's device channels, shifted so it starts at ``start_ms``."""

    def __init__(self, data_file: str, start_ms: int | None = None) -> None:
        path = Path(data_file)
        if not path.is_file():
            raise InvalidSpecError(f"Invalid UCI replay data_file {data_file!r}: not a file")
        recording = load_uci_file(path)
        shift = 0 if start_ms is None else start_ms - int(recording.times_ms[0])
        self._series: dict[str, tuple[NDArray[np.int64], NDArray[np.float64]]] = {}
        for i, channel in enumerate(CHANNELS):
            values = recording.device[:, i]
            present = ~np.isnan(values)
            self._series[channel] = (recording.times_ms[present] + shift, values[present])
        self._positions = dict.fromkeys(CHANNELS, 0)
        self._closed = False

    @property
    def metrics(self) -> tuple[str, ...]:
        return CHANNELS

    @property
    def sample_interval_ms(self) -> int:
        return HOUR_MS

    def read(self, until_ms: int) -> list[SampleBlock]:
        if self._closed:
            raise SimulationError("UCI replay driver is closed")
        return read_series(self._series, self._positions, until_ms)

    def close(self) -> None:
        self._closed = True
