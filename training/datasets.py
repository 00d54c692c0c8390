"""Loaders of the real data sets in ``../shared/datasets`` (read in place, never copied).

Each loader returns plain numpy arrays with times as epoch milliseconds. Quirks are
handled as each data set's SOURCE.md describes them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from firmware_sim.errors import SimulationError
from firmware_sim.replay_uci import load_uci_file
from training.errors import TrainingError

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def datasets_dir() -> Path:
    """``CIVICMESH_DATASETS`` or ``../shared/datasets`` beside the project."""
    path = Path(os.environ.get("CIVICMESH_DATASETS", _DEFAULT))
    if not path.is_dir():
        raise TrainingError(
            f"data sets not found at {path}; set CIVICMESH_DATASETS to the datasets folder"
        )
    return path


def _ms(stamp: datetime) -> int:
    return int(stamp.replace(tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class UciAirQuality:
    """Hourly metal-oxide responses beside a reference analyzer (De Vito et al.).

    Times are the station's local clock read as UTC (it did not follow DST). Missing
    values (``-200`` in the file) are NaN. Parsed by the replay driver's own loader, so
    training and on-device replay read the file the same way.
    """

    times_ms: NDArray[np.int64]
    mox: NDArray[np.float64]  # (n, 5): PT08.S1 .. PT08.S5
    temperature: NDArray[np.float64]
    rh: NDArray[np.float64]
    abs_humidity: NDArray[np.float64]
    co: NDArray[np.float64]  # reference CO, mg/m³
    no2: NDArray[np.float64]  # reference NO2, µg/m³


def uci_file(root: Path | None = None) -> Path:
    return (root or datasets_dir()) / "uci_air_quality" / "AirQualityUCI.csv"


def load_uci(root: Path | None = None) -> UciAirQuality:
    try:
        recording = load_uci_file(uci_file(root))
    except SimulationError as exc:
        raise TrainingError(str(exc)) from exc
    device = recording.device
    return UciAirQuality(
        times_ms=recording.times_ms,
        mox=device[:, 0:5],
        temperature=device[:, 5],
        rh=device[:, 6],
        abs_humidity=device[:, 7],
        co=recording.co,
        no2=recording.no2,
    )


@dataclass(frozen=True)
class PurpleAirColocation:
    """Daily PurpleAir PA-II (CF=1, A/B mean) beside US-EPA AQS monitors within 0.5 km."""

    site: NDArray[np.str_]
    day: NDArray[np.str_]  # YYYY-MM-DD
    reference: NDArray[np.float64]
    pa_cf1: NDArray[np.float64]
    rh: NDArray[np.float64]
    temperature: NDArray[np.float64]


def load_purpleair(root: Path | None = None) -> PurpleAirColocation:
    path = (
        (root or datasets_dir())
        / "purpleair_aqs_colocation"
        / "DAILY90_r0_5km_processeddata_PA_AQS_Jan2021_Aug2023_Final.csv"
    )
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return PurpleAirColocation(
            site=np.array([r["sensor_index"] for r in rows]),
            day=np.array([r["DAILY"] for r in rows]),
            reference=np.array([float(r["conc"]) for r in rows]),
            pa_cf1=np.array([float(r["A_B_Avg"]) for r in rows]),
            rh=np.array([float(r["humidity_a"]) for r in rows]),
            temperature=np.array([float(r["temp_Celsius"]) for r in rows]),
        )
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"cannot read {path}: {exc}") from exc


def epa_purpleair_correction(
    pa_cf1: NDArray[np.float64], rh: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The published US-EPA correction for PurpleAir (Barkjohn et al. 2021, nationwide):
    PM2.5 = 0.524 x PA(cf_1) - 0.0862 x RH + 5.75."""
    out: NDArray[np.float64] = 0.524 * pa_cf1 - 0.0862 * rh + 5.75
    return out


@dataclass(frozen=True)
class Stream:
    """One real sensor stream: a metric of one device, with its partner channel if any."""

    device: str
    metric: str
    times_ms: NDArray[np.int64]
    values: NDArray[np.float64]
    interval_ms: int
    partner: NDArray[np.float64] | None = None


_ABERDEEN_COLUMNS = {
    "sds011": {"P2": "pm25", "P1": "pm10"},
    "dht22": {"temperature": "temperature", "humidity": "relativehumidity"},
    "bme280": {"temperature": "temperature", "humidity": "relativehumidity"},
}


def _iso_ms(text: str) -> int:
    return _ms(datetime.fromisoformat(text).replace(tzinfo=None))


def load_aberdeen(root: Path | None = None, limit_sensors: int | None = None) -> list[Stream]:
    """Sensor.Community streams of one week in Aberdeen (SDS011 PM, DHT22/BME280 T and RH).

    PM2.5 and PM10 of one SDS011 are paired (same timestamps) as each other's partner.
    """
    folder = (root or datasets_dir()) / "sensor_community_aberdeen" / "daily_files"
    files: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.glob("*_sensor_*.csv")):
        parts = path.stem.split("_")
        files.setdefault((parts[1].lower(), parts[-1]), []).append(path)
    keys = sorted(files)
    if limit_sensors is not None:  # the first few of each sensor type
        keys = [k for k in keys if [j for j in keys if j[0] == k[0]].index(k) < limit_sensors]
    streams: list[Stream] = []
    for sensor_type, sensor_id in keys:
        columns = _ABERDEEN_COLUMNS.get(sensor_type)
        if columns is None:
            continue
        times: list[int] = []
        values: dict[str, list[float]] = {m: [] for m in columns.values()}
        for path in files[(sensor_type, sensor_id)]:
            with path.open(encoding="utf-8", newline="") as handle:
                for row in csv.DictReader(handle, delimiter=";"):
                    try:
                        t = _iso_ms(row["timestamp"])
                        parsed = {m: float(row[c]) for c, m in columns.items()}
                    except (KeyError, TypeError, ValueError):
                        continue  # a row without all channels: the gap stays a gap
                    times.append(t)
                    for metric, value in parsed.items():
                        values[metric].append(value)
        if len(times) < 100:
            continue
        order = np.argsort(np.array(times, dtype=np.int64), kind="stable")
        t_arr = np.array(times, dtype=np.int64)[order]
        arrays = {m: np.array(v, dtype=np.float64)[order] for m, v in values.items()}
        interval = int(np.median(np.diff(t_arr)))
        device = f"{sensor_type}-{sensor_id}"
        for metric, array in arrays.items():
            partner_metric = {"pm25": "pm10", "pm10": "pm25"}.get(metric)
            streams.append(
                Stream(
                    device,
                    metric,
                    t_arr,
                    array,
                    interval,
                    arrays[partner_metric] if partner_metric else None,
                )
            )
    if not streams:
        raise TrainingError(f"no Sensor.Community streams found in {folder}")
    return streams


def load_aarhus(
    root: Path | None = None, limit_points: int | None = None, days: int = 7
) -> list[Stream]:
    """Aarhus road traffic (vehicle count and mean speed per 5 minutes), first ``days``."""
    folder = (root or datasets_dir()) / "aarhus_citypulse" / "traffic_24points_full"
    paths = sorted(folder.glob("AarhusTrafficData*.csv"))[:limit_points]
    streams: list[Stream] = []
    for path in paths:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        seen: set[int] = set()
        times, counts, speeds = [], [], []
        for row in rows:
            try:
                t = _iso_ms(row["TIMESTAMP"])
                count, speed = float(row["vehicleCount"]), float(row["avgSpeed"])
            except (KeyError, ValueError):
                continue
            if t in seen:
                continue  # the data set's duplicate timestamps
            seen.add(t)
            times.append(t)
            counts.append(count)
            speeds.append(speed)
        order = np.argsort(np.array(times, dtype=np.int64), kind="stable")
        t_arr = np.array(times, dtype=np.int64)[order]
        keep = t_arr < t_arr[0] + days * 86_400_000
        device = f"aarhus-{path.stem.removeprefix('AarhusTrafficData')}"
        for metric, series in (("vehicle_count", counts), ("mean_speed", speeds)):
            array = np.array(series, dtype=np.float64)[order]
            streams.append(Stream(device, metric, t_arr[keep], array[keep], 300_000))
    if not streams:
        raise TrainingError(f"no Aarhus traffic files found in {folder}")
    return streams
