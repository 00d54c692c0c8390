"""Signal models: traffic, gases, particles and weather as pure functions of time.

Every function takes :class:`SignalParams` and an array of epoch-millisecond times and
returns arrays of the same length. A value depends only on (params, t): randomness comes
from :mod:`firmware_sim.rng`, keyed on the sample time, and the weather is a smooth
multi-day process built from per-day hashed draws. So one read of two hours gives
exactly the samples of two reads of one hour.

The weather (stagnation, temperature anomaly) is keyed on ``weather_seed`` and shared by
every device of a city; device-level details (exact traffic exposure, sensor gain,
noise) are keyed on the device ``seed``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from civicmesh.metrics import BY_NAME, METRICS
from firmware_sim import rng
from firmware_sim.errors import InvalidSpecError

FloatArray = NDArray[np.float64]
TimeArray = NDArray[np.int64]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

ALL_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS)

# Stream ids for rng keys; never reuse one for two purposes (values would correlate).
_S_DAY_TRAFFIC = 1
_S_STAGNATION = 2
_S_TEMP_ANOMALY = 3
_S_DRYNESS = 4
_S_DEVICE = 5
_S_NOISE = 100  # + 16 * metric code + sub-stream

_LANE_CAPACITY_VPH = 1800.0  # vehicles per hour per lane at saturation
_VEHICLE_LENGTH_KM = 0.0065  # effective vehicle + detector length, for occupancy
# Daily weights of the multi-day weather process (a week-long triangular kernel),
# scaled to unit variance so thresholds below read in standard deviations.
_WEATHER_KERNEL = np.array([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0])
_WEATHER_KERNEL = _WEATHER_KERNEL / np.sqrt(np.sum(_WEATHER_KERNEL**2))


@dataclass(frozen=True, slots=True)
class SignalParams:
    """What shapes one device's signals (zone character + device seed)."""

    seed: int
    traffic_intensity: float = 0.6  # 0 = no road, 1 = a busy road at capacity in rush hour
    background_level: float = 1.0  # 1 = typical urban background pollution
    free_speed_kmh: float = 50.0
    lanes: int = 2
    weather_seed: int = 0
    utc_offset_min: int = 0  # local time drives rush hours and the sun
    sample_interval_ms: int = 20_000

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool], ...] = (
            ("traffic_intensity must be within [0, 2]", 0.0 <= self.traffic_intensity <= 2.0),
            ("background_level must be within [0, 10]", 0.0 <= self.background_level <= 10.0),
            ("free_speed_kmh must be within [5, 200]", 5.0 <= self.free_speed_kmh <= 200.0),
            ("lanes must be within [1, 8]", 1 <= self.lanes <= 8),
            ("utc_offset_min must be within ±14 h", abs(self.utc_offset_min) <= 14 * 60),
            (
                "sample_interval_ms must be within [100, 3600000]",
                100 <= self.sample_interval_ms <= HOUR_MS,
            ),
        )
        for message, ok in checks:
            if not ok:
                raise InvalidSpecError(f"Invalid signal parameters: {message}")


@dataclass(frozen=True, slots=True)
class _Clock:
    hour: FloatArray  # local hour of day, [0, 24)
    day: TimeArray  # local day number since the epoch
    weekday: NDArray[np.int64]  # 0 = Monday
    day_of_year: FloatArray


@dataclass(frozen=True, slots=True)
class _Weather:
    stagnation: FloatArray  # ~N(0, 1); high = low wind, humid, episode
    wind_ms: FloatArray
    dispersion: FloatArray  # > 1 when pollutants accumulate
    mixing: FloatArray  # nocturnal boundary layer: > 1 at night
    temperature: FloatArray  # noiseless
    relativehumidity: FloatArray  # noiseless


def as_times(times_ms: ArrayLike) -> TimeArray:
    """Times as a 1-D int64 array (epoch ms)."""
    arr = np.asarray(times_ms, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("times must be a one-dimensional array")
    return arr


def _clock(params: SignalParams, times: TimeArray) -> _Clock:
    local = times + params.utc_offset_min * 60_000
    day = np.floor_divide(local, DAY_MS)
    hour = (local - day * DAY_MS) / HOUR_MS
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday
    # Mean tropical year; exact calendar days do not matter for a seasonal cycle.
    day_of_year = np.mod(local / DAY_MS, 365.2425)
    return _Clock(hour, day, weekday, day_of_year)


def _daily_process(key: int, times: TimeArray, utc_offset_min: int) -> FloatArray:
    """A smooth ~N(0, 1) process with multi-day memory, pure in t.

    Each local day gets an iid normal draw hashed from its number; the process value at a
    day's noon is a week-long weighted sum of those draws, and values in between are
    cosine-interpolated. Accumulation runs in a fixed order per element, so the result is
    bit-identical for any set of times.
    """
    position = (times + utc_offset_min * 60_000) / DAY_MS - 0.5
    d0 = np.floor(position).astype(np.int64)
    frac = position - d0
    half = len(_WEATHER_KERNEL) // 2
    lo = int(d0.min()) - half
    hi = int(d0.max()) + 1 + half
    draws = rng.normal(key, np.arange(lo, hi + 1, dtype=np.int64))
    count = len(draws) - 2 * half  # process values for days lo+half .. hi-half
    process = np.zeros(count)
    for j, weight in enumerate(_WEATHER_KERNEL):
        process = process + weight * draws[j : j + count]
    first = d0 - (lo + half)
    blend = (1.0 - np.cos(np.pi * frac)) / 2.0
    result: FloatArray = process[first] * (1.0 - blend) + process[first + 1] * blend
    return result


def _gauss(x: FloatArray, centre: float, width: float) -> FloatArray:
    result: FloatArray = np.exp(-0.5 * ((x - centre) / width) ** 2)
    return result


def _plateau(x: FloatArray, rise: float, fall: float, steepness: float = 1.6) -> FloatArray:
    result: FloatArray = 1.0 / (1.0 + np.exp(-steepness * (x - rise)))
    return result / (1.0 + np.exp(-steepness * (fall - x)))


def _demand(params: SignalParams, times: TimeArray, clock: _Clock) -> FloatArray:
    h = clock.hour
    weekday_profile = (
        0.04
        + 0.45 * _plateau(h, 6.5, 20.0)
        + 0.55 * _gauss(h, 8.0, 1.0)
        + 0.50 * _gauss(h, 17.25, 1.3)
    )
    weekend_profile = 0.04 + 0.33 * _plateau(h, 9.0, 21.0, 1.0) + 0.12 * _gauss(h, 13.5, 2.5)
    weekend_profile = np.where(clock.weekday == 6, 0.8 * weekend_profile, weekend_profile)
    profile = np.where(clock.weekday >= 5, weekend_profile, weekday_profile)
    # Some days are busier than others across the whole city (events, school holidays).
    day_factor = 1.0 + 0.06 * rng.normal(
        rng.stream_key(params.weather_seed, _S_DAY_TRAFFIC), clock.day
    )
    result: FloatArray = profile * day_factor
    return result


def _weather(params: SignalParams, times: TimeArray, clock: _Clock) -> _Weather:
    ws = params.weather_seed
    offset = params.utc_offset_min
    stagnation = _daily_process(rng.stream_key(ws, _S_STAGNATION), times, offset)
    anomaly = _daily_process(rng.stream_key(ws, _S_TEMP_ANOMALY), times, offset)
    dryness = _daily_process(rng.stream_key(ws, _S_DRYNESS), times, offset)
    wind_ms = 4.5 * np.exp(-0.45 * stagnation)
    dispersion = (3.5 / wind_ms) ** 0.7
    mixing = 1.0 + 0.3 * np.cos(2.0 * np.pi * (clock.hour - 2.0) / 24.0)

    # Seasonal mean of a cool maritime city (coldest mid-January), daily cycle peaking
    # mid-afternoon; still, clear (stagnant) days swing further.
    season_mean = 9.0 - 5.5 * np.cos(2.0 * np.pi * (clock.day_of_year - 15.0) / 365.2425)
    amplitude = 3.0 + 1.2 * np.clip(stagnation, -1.0, 2.0)
    daily_mean = season_mean + 2.5 * anomaly
    cycle = np.cos(2.0 * np.pi * (clock.hour - 15.0) / 24.0)
    cycle = cycle + 0.2 * np.cos(4.0 * np.pi * (clock.hour - 15.0) / 24.0)
    temperature = daily_mean + amplitude * cycle / 1.2
    # Humidity from a dew point that follows the daily mean: it rises as the air cools at
    # night; stagnant days are damp (small dew-point depression).
    depression = np.clip(3.5 - 1.0 * stagnation + 0.8 * dryness, 0.5, 10.0)
    dew_point = daily_mean - depression
    rh = 100.0 * np.exp(
        17.625 * dew_point / (243.04 + dew_point) - 17.625 * temperature / (243.04 + temperature)
    )
    return _Weather(stagnation, wind_ms, dispersion, mixing, temperature, np.clip(rh, 5.0, 100.0))


class _DeviceConstants:
    """Per-device exposure and sensor gains, drawn once from the device seed."""

    def __init__(self, seed: int) -> None:
        def draw(index: int) -> float:
            return rng.scalar_uniform(rng.stream_key(seed, _S_DEVICE, index))

        self.traffic_exposure = 0.85 + 0.3 * draw(0)  # distance to the kerb, etc.
        self.gain = {name: 0.95 + 0.1 * draw(10 + m.code) for name, m in BY_NAME.items()}


@functools.lru_cache(maxsize=1024)
def _device_constants(seed: int) -> _DeviceConstants:
    return _DeviceConstants(seed)


def _noise(seed: int, metric_name: str, sub: int, times: TimeArray) -> FloatArray:
    code = BY_NAME[metric_name].code
    return rng.normal(rng.stream_key(seed, _S_NOISE + 16 * code + sub), times)


Noise = Callable[..., FloatArray]  # noise(metric, sub=0): the metric's own stream


def _traffic(params: SignalParams, load: FloatArray, noise: Noise) -> dict[str, FloatArray]:
    """vehicle_count, mean_speed and occupancy from the road's load (v/c ratio)."""
    flow_vph = _LANE_CAPACITY_VPH * params.lanes * load
    expected = flow_vph * params.sample_interval_ms / HOUR_MS
    count = np.rint(expected + np.sqrt(expected) * noise("vehicle_count"))
    # BPR-style speed-flow curve: speed collapses as load nears capacity.
    congestion = np.minimum(load, 1.4)
    speed = params.free_speed_kmh / (1.0 + 1.5 * congestion**4)
    density = flow_vph / params.lanes / speed  # vehicles per km and lane
    occupancy = 100.0 * density * _VEHICLE_LENGTH_KM
    occupancy = occupancy * (1.0 + 0.1 * noise("occupancy")) + 0.2 * noise("occupancy", 1)
    return {
        "vehicle_count": np.maximum(count, 0.0),
        "mean_speed": np.clip(speed * (1.0 + 0.06 * noise("mean_speed")), 0.0, 250.0),
        "occupancy": np.clip(occupancy, 0.0, 98.0),
    }


def _pm25(
    bg: float,
    weather: _Weather,
    device: _DeviceConstants,
    traffic: tuple[FloatArray, FloatArray],
    noise: Noise,
) -> FloatArray:
    """Fine particles: background, episodes, traffic (load, dilution) and humidity."""
    load, dilution = traffic
    # Episodes: several still, damp days let fine particles accumulate.
    episode = 1.0 + 2.0 * np.maximum(weather.stagnation - 0.4, 0.0) ** 1.3
    hygroscopic = 1.0 + 0.25 * np.maximum(weather.relativehumidity - 75.0, 0.0) / 25.0
    pm25_clean = (
        5.5 * bg * episode * weather.dispersion**0.3 + 3.5 * load * dilution
    ) * hygroscopic
    pm25 = pm25_clean * device.gain["pm25"] * (1.0 + 0.08 * noise("pm25"))
    result: FloatArray = np.maximum(pm25 + 0.4 * noise("pm25", 1), 0.0)
    return result


def simulate(
    params: SignalParams, times_ms: ArrayLike, metrics: Iterable[str] = ALL_METRICS
) -> dict[str, FloatArray]:
    """Noisy sensor values for ``metrics`` at ``times_ms`` (units per civicmesh.metrics)."""
    times = as_times(times_ms)
    wanted = tuple(metrics)
    for name in wanted:
        if name not in BY_NAME:
            raise InvalidSpecError(f"Unknown metric {name!r}")
    if times.size == 0:
        return {name: np.zeros(0) for name in wanted}
    clock = _clock(params, times)
    weather = _weather(params, times, clock)
    device = _device_constants(params.seed)
    seed = params.seed

    def noise(name: str, sub: int = 0) -> FloatArray:
        return _noise(seed, name, sub, times)

    out: dict[str, FloatArray] = {}
    # Emission index: vehicles passing relative to road capacity (the v/c ratio).
    load = params.traffic_intensity * device.traffic_exposure * _demand(params, times, clock)
    dilution = weather.dispersion * weather.mixing
    traffic_no2 = 42.0 * load * dilution

    if {"vehicle_count", "mean_speed", "occupancy"} & set(wanted):
        out.update(_traffic(params, load, noise))

    bg = params.background_level
    if "no2" in wanted:
        no2 = (12.0 * bg * np.sqrt(dilution) + traffic_no2) * device.gain["no2"]
        no2 = no2 * (1.0 + 0.04 * noise("no2")) + 1.5 * noise("no2", 1)
        out["no2"] = np.maximum(no2, 0.0)
    if "o3" in wanted:
        # Photochemistry peaks mid-afternoon and in summer; NO from traffic titrates O3.
        sun = np.maximum(np.sin(np.pi * (clock.hour - 7.0) / 15.0), 0.0) ** 1.3
        season = np.sin(2.0 * np.pi * (clock.day_of_year - 80.0) / 365.2425)
        regional = (55.0 + 18.0 * season) * (0.45 + 0.55 * sun) * (1.0 + 0.08 * weather.stagnation)
        o3 = (regional - 0.8 * traffic_no2) * device.gain["o3"]
        o3 = o3 * (1.0 + 0.04 * noise("o3")) + 2.0 * noise("o3", 1)
        # titrated to nothing, an electrochemical sensor still reads its own noise: a
        # constant floor would repeat one value for hours and look stuck
        out["o3"] = np.maximum(o3, 1.0 + 1.5 * np.abs(noise("o3", 2)))
    if "co" in wanted:
        co = (0.18 * bg * np.sqrt(dilution) + 0.9 * load * dilution) * device.gain["co"]
        co = co * (1.0 + 0.05 * noise("co")) + 0.02 * noise("co", 1)
        out["co"] = np.maximum(co, 0.0)
    if "pm25" in wanted or "pm10" in wanted:
        pm25 = _pm25(bg, weather, device, (load, dilution), noise)
        if "pm25" in wanted:
            out["pm25"] = pm25
        if "pm10" in wanted:
            # Coarse fraction: sea salt and dust lifted by wind, road abrasion.
            coarse = 3.0 * bg * np.sqrt(weather.wind_ms / 4.0) + 6.0 * load * dilution
            pm10 = pm25 * 1.45 + coarse * device.gain["pm10"] * (1.0 + 0.1 * noise("pm10"))
            out["pm10"] = np.maximum(pm10 + 0.5 * noise("pm10", 1), pm25)
    if "temperature" in wanted:
        temperature = weather.temperature + 0.15 * noise("temperature")
        out["temperature"] = temperature + (device.gain["temperature"] - 1.0) * 4.0
    if "relativehumidity" in wanted:
        rh = weather.relativehumidity + 1.2 * noise("relativehumidity")
        out["relativehumidity"] = np.clip(rh, 0.0, 100.0)
    return {name: out[name] for name in wanted}


def traffic(params: SignalParams, times_ms: ArrayLike) -> dict[str, FloatArray]:
    """vehicle_count (per sample interval), mean_speed (km/h), occupancy (%)."""
    return simulate(params, times_ms, ("vehicle_count", "mean_speed", "occupancy"))


def air(params: SignalParams, times_ms: ArrayLike) -> dict[str, FloatArray]:
    """pm25, pm10, no2, o3 (µg/m³) and co (mg/m³)."""
    return simulate(params, times_ms, ("pm25", "pm10", "no2", "o3", "co"))


def weather(params: SignalParams, times_ms: ArrayLike) -> dict[str, FloatArray]:
    """temperature (°C) and relativehumidity (%)."""
    return simulate(params, times_ms, ("temperature", "relativehumidity"))


def stagnation(params: SignalParams, times_ms: ArrayLike) -> FloatArray:
    """The city's weather state (~N(0, 1); > 1 means a still, damp pollution-episode day)."""
    times = as_times(times_ms)
    if times.size == 0:
        return np.zeros(0)
    return _weather(params, times, _clock(params, times)).stagnation
