"""firmware_sim: city layout, signal realism, read-chunking independence, faults, driver."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from civicmesh.cli import main as civicmesh_main
from civicmesh.drivers import DriverError, SampleBlock, SensorDriver, load_driver
from civicmesh.metrics import BY_NAME
from firmware_sim.city import CITY_BOX, SimulatedCity
from firmware_sim.driver import METRICS_BY_KIND, SimulatedDriver
from firmware_sim.errors import InvalidSpecError
from firmware_sim.faults import Fault, apply_faults, parse_faults
from firmware_sim.signals import ALL_METRICS, DAY_MS, HOUR_MS, SignalParams, simulate

MONDAY = 1_709_510_400_000  # 2024-03-04T00:00:00Z, a Monday
WEEK_MS = 7 * DAY_MS
INTERVAL = 20_000
RING_ROAD = {
    "name": "ring-road",
    "traffic_intensity": 1.0,
    "background_level": 1.1,
    "free_speed_kmh": 80.0,
    "lanes": 3,
    "weather_seed": 99,
    "utc_offset_min": 0,
}


def read_all(driver: SensorDriver, until_ms: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {b.metric: (np.asarray(b.times_ms), np.asarray(b.values)) for b in driver.read(until_ms)}


def read_chunked(
    driver: SensorDriver, untils: list[int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, list[SampleBlock]] = {}
    for until in untils:
        for block in driver.read(until):
            parts.setdefault(block.metric, []).append(block)
    return {
        metric: (
            np.concatenate([np.asarray(b.times_ms) for b in blocks]),
            np.concatenate([np.asarray(b.values) for b in blocks]),
        )
        for metric, blocks in parts.items()
    }


@pytest.fixture(scope="module")
def week() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One simulated week (Monday to Sunday) of a busy multi-sensor."""
    driver = SimulatedDriver(seed=5, zone_profile=RING_ROAD, start_ms=MONDAY)
    return read_all(driver, MONDAY + WEEK_MS)


def hours_of(times: np.ndarray) -> np.ndarray:
    return (times % DAY_MS) / HOUR_MS


# ----------------------------------------------------------------- determinism, chunking


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    a = read_all(SimulatedDriver(seed=1, start_ms=MONDAY), MONDAY + 6 * HOUR_MS)
    b = read_all(SimulatedDriver(seed=1, start_ms=MONDAY), MONDAY + 6 * HOUR_MS)
    c = read_all(SimulatedDriver(seed=2, start_ms=MONDAY), MONDAY + 6 * HOUR_MS)
    assert set(a) == set(ALL_METRICS)
    for metric in ALL_METRICS:
        np.testing.assert_array_equal(a[metric][0], b[metric][0])
        np.testing.assert_array_equal(a[metric][1], b[metric][1])
        assert not np.array_equal(a[metric][1], c[metric][1]), metric


def fault_spec(
    kind: str, metric: str, start_h: float, end_h: float, **extra: Any
) -> dict[str, Any]:
    """A fault table as found in a config file, window in hours after MONDAY."""
    window = {"start_ms": MONDAY + int(start_h * HOUR_MS), "end_ms": MONDAY + int(end_h * HOUR_MS)}
    return {"kind": kind, "metric": metric, **window, **extra}


FAULT_SPECS: list[dict[str, Any]] = [
    fault_spec("drift", "no2", 1, 30, magnitude=20.0),
    {**fault_spec("stuck", "pm25", 5, 9), "start_ms": MONDAY + 5 * HOUR_MS + 7},  # off-grid
    fault_spec("spike", "pm10", 0, 24, magnitude=500.0, rate=0.02),
    fault_spec("dropout", "*", 10, 11),
    fault_spec("dropout", "temperature", 0, 24, magnitude=0.3),
    fault_spec("noise", "vehicle_count", 0, 24, magnitude=3.0),
    fault_spec("stuck", "no2", 20, 21),
]


@pytest.mark.parametrize("faults", [None, FAULT_SPECS], ids=["clean", "faulted"])
def test_chunked_reads_equal_one_read(faults: list[dict[str, Any]] | None) -> None:
    end = MONDAY + 26 * HOUR_MS
    options: dict[str, Any] = {"seed": 3, "zone_profile": RING_ROAD, "start_ms": MONDAY - 1}
    if faults is not None:
        options["faults"] = faults
    whole = read_all(SimulatedDriver(**options), end)
    # Irregular, off-grid chunk ends; a repeated and a backwards `until` return nothing new.
    cuts = np.random.default_rng(0).integers(MONDAY, end, size=40)
    untils = [int(c) for c in np.sort(cuts)] + [MONDAY + 3 * HOUR_MS, end, end]
    pieces = read_chunked(SimulatedDriver(**options), untils)
    assert set(pieces) == set(whole)
    for metric, (times, values) in whole.items():
        np.testing.assert_array_equal(pieces[metric][0], times)
        np.testing.assert_array_equal(pieces[metric][1], values)
        assert np.all(times % INTERVAL == 0), "samples must lie on the epoch-aligned grid"
        assert np.all(np.diff(times) > 0)


def test_grid_and_cursor() -> None:
    driver = SimulatedDriver(seed=1, kind="traffic", start_ms=MONDAY + 1)
    blocks = driver.read(MONDAY + 10 * INTERVAL + 1)
    assert [b.metric for b in blocks] == ["vehicle_count", "mean_speed", "occupancy"]
    times = np.asarray(blocks[0].times_ms)
    # start rounded up to the grid; until is exclusive but the grid time before it is in.
    assert times[0] == MONDAY + INTERVAL and times[-1] == MONDAY + 10 * INTERVAL
    assert len(times) == 10
    assert driver.read(MONDAY + 10 * INTERVAL + 5) == []
    # Without start_ms the first read returns only the latest grid sample.
    fresh = SimulatedDriver(seed=1, kind="air")
    first = fresh.read(MONDAY + 5 * INTERVAL + 3)
    assert all(list(np.asarray(b.times_ms)) == [MONDAY + 5 * INTERVAL] for b in first)
    fresh.close()
    with pytest.raises(DriverError):
        fresh.read(MONDAY + DAY_MS)


def test_week_of_one_device_has_every_sample(
    week: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    for times, values in week.values():
        assert len(times) == WEEK_MS // INTERVAL == 30_240
        assert values.dtype == np.float64 and np.all(np.isfinite(values))


# ----------------------------------------------------------------------------- realism


def test_values_inside_plausible_ranges(week: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    # Catalogue ranges are physical limits; the tighter ones are what a city shows.
    typical = {
        "pm25": (0, 300), "pm10": (0, 500), "no2": (0, 400), "o3": (0, 250), "co": (0, 15),
        "temperature": (-30, 40), "relativehumidity": (0, 100), "vehicle_count": (0, 200),
        "mean_speed": (3, 120), "occupancy": (0, 100),
    }  # fmt: skip
    for metric, (_, values) in week.items():
        low, high = typical[metric]
        assert BY_NAME[metric].minimum <= values.min() and values.max() <= BY_NAME[metric].maximum
        assert low <= values.min() and values.max() <= high, metric
    counts = week["vehicle_count"][1]
    assert np.array_equal(counts, np.round(counts)), "vehicle counts are whole vehicles"


def test_weekday_rush_hour_busier_than_night(
    week: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    times, counts = week["vehicle_count"]
    weekday = (times - MONDAY) < 5 * DAY_MS
    hour = hours_of(times)
    morning = counts[weekday & (hour >= 7.5) & (hour < 9)].mean()
    evening = counts[weekday & (hour >= 16.5) & (hour < 18.5)].mean()
    night = counts[weekday & (hour >= 1) & (hour < 4)].mean()
    assert morning > 5 * night and evening > 5 * night
    speed = week["mean_speed"][1]
    assert speed[weekday & (hour >= 7.5) & (hour < 9)].mean() < speed[hour < 4].mean() * 0.9


def test_weekends_carry_less_traffic(week: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    times, counts = week["vehicle_count"]
    day = (times - MONDAY) // DAY_MS
    daily = np.array([counts[day == d].sum() for d in range(7)])
    assert daily[5:].max() < daily[:5].min()


def test_pollutants_follow_traffic_and_sun(week: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    counts = week["vehicle_count"][1]
    no2 = week["no2"][1]
    assert np.corrcoef(counts, no2)[0, 1] > 0.5
    assert np.corrcoef(counts, week["co"][1])[0, 1] > 0.5
    assert np.corrcoef(no2, week["o3"][1])[0, 1] < 0
    hour = hours_of(week["o3"][0])
    o3 = week["o3"][1]
    assert o3[(hour >= 13) & (hour < 17)].mean() > 1.5 * o3[(hour >= 4) & (hour < 7)].mean()
    temperature = week["temperature"][1]
    assert (
        temperature[(hour >= 13) & (hour < 17)].mean()
        > temperature[(hour >= 3) & (hour < 6)].mean() + 2
    )
    # Within a day, humidity falls as the air warms (the dew point hardly moves).
    day = (week["temperature"][0] - MONDAY) // DAY_MS
    humidity = week["relativehumidity"][1]
    for d in range(7):
        assert np.corrcoef(temperature[day == d], humidity[day == d])[0, 1] < -0.5


def test_no2_tracks_traffic_in_every_zone_of_a_city() -> None:
    city = SimulatedCity.generate(4, devices=8, zones=4)
    for device in city.devices:
        if device.kind != "multi":
            continue
        data = read_all(
            SimulatedDriver(**dict(device.driver_options, start_ms=MONDAY)), MONDAY + WEEK_MS
        )
        r = np.corrcoef(data["vehicle_count"][1], data["no2"][1])[0, 1]
        assert r > 0.5, f"{device.name}: r={r:.2f}"


def test_particle_episodes_follow_stagnant_weather() -> None:
    params = SignalParams(seed=1, weather_seed=7)
    times = MONDAY + np.arange(0, 120 * DAY_MS, HOUR_MS, dtype=np.int64)
    pm25 = simulate(params, times, ("pm25",))["pm25"]
    daily = pm25.reshape(120, 24).mean(axis=1)
    # Episodes last days: daily means are strongly autocorrelated and occasionally high.
    assert np.corrcoef(daily[:-1], daily[1:])[0, 1] > 0.6
    assert daily.max() > 2 * np.median(daily)


def test_signal_is_pure_in_time() -> None:
    params = SignalParams(seed=9, traffic_intensity=0.7, weather_seed=2)
    times = MONDAY + np.arange(0, 3 * DAY_MS, INTERVAL, dtype=np.int64)
    whole = simulate(params, times)
    shuffled = np.random.default_rng(1).permutation(len(times))
    scattered = simulate(params, times[shuffled])
    for metric in ALL_METRICS:
        np.testing.assert_array_equal(scattered[metric], whole[metric][shuffled])


# ------------------------------------------------------------------------------ faults


def clean_series() -> tuple[np.ndarray, np.ndarray]:
    times = MONDAY + np.arange(0, DAY_MS, INTERVAL, dtype=np.int64)
    return times, simulate(SignalParams(seed=4), times, ("no2",))["no2"]


WINDOW = (MONDAY + 6 * HOUR_MS, MONDAY + 12 * HOUR_MS)


def inside(times: np.ndarray) -> np.ndarray:
    return (times >= WINDOW[0]) & (times < WINDOW[1])


def faulted(kind: str, **extra: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    times, values = clean_series()
    fault = Fault(kind, "no2", WINDOW[0], WINDOW[1], **extra)
    new_times, new_values = apply_faults("no2", times, values, [fault], seed=1)
    return times, values, new_times, new_values


@pytest.mark.parametrize("kind", ["stuck", "spike", "drift", "noise"])
def test_value_faults_act_only_inside_their_window(kind: str) -> None:
    times, values, new_times, new_values = faulted(kind, magnitude=5.0, rate=0.05)
    np.testing.assert_array_equal(new_times, times)
    mask = inside(times)
    np.testing.assert_array_equal(new_values[~mask], values[~mask])
    assert not np.array_equal(new_values[mask], values[mask])


def test_stuck_holds_the_first_value_of_its_window() -> None:
    times, values, _, new_values = faulted("stuck")
    mask = inside(times)
    assert np.all(new_values[mask] == values[mask][0])
    held = apply_faults("no2", times, values, [Fault("stuck", "no2", *WINDOW, hold_value=3.5)], 1)
    assert np.all(held[1][mask] == 3.5)


def test_spikes_are_rare_isolated_jumps_of_the_magnitude() -> None:
    times, values, _, new_values = faulted("spike", magnitude=400.0, rate=0.02)
    jumps = np.flatnonzero(new_values != values)
    assert np.all(inside(times[jumps]))
    np.testing.assert_allclose(new_values[jumps] - values[jumps], 400.0)
    window_samples = int(inside(times).sum())
    assert 0.005 * window_samples < len(jumps) < 0.05 * window_samples


def test_drift_is_a_linear_ramp_to_its_magnitude() -> None:
    times, values, _, new_values = faulted("drift", magnitude=30.0)
    mask = inside(times)
    offset = new_values[mask] - values[mask]
    expected = 30.0 * (times[mask] - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    np.testing.assert_allclose(offset, expected, atol=1e-9)
    assert offset[0] == 0 and offset[-1] > 29.9


def test_dropout_removes_samples_of_its_window() -> None:
    times, values, new_times, new_values = faulted("dropout")
    np.testing.assert_array_equal(new_times, times[~inside(times)])
    np.testing.assert_array_equal(new_values, values[~inside(times)])
    times, _, partial, _ = faulted("dropout", magnitude=0.5)
    kept = int(inside(partial).sum())
    assert 0.4 < kept / inside(times).sum() < 0.6
    assert int((~inside(partial)).sum()) == int((~inside(times)).sum())


def test_noise_adds_gaussian_noise_of_the_magnitude() -> None:
    times, values, _, new_values = faulted("noise", magnitude=4.0)
    diff = (new_values - values)[inside(times)]
    assert 3.6 < diff.std() < 4.4 and abs(diff.mean()) < 0.4


def test_faults_touch_only_their_metric() -> None:
    times, values = clean_series()
    fault = Fault("drift", "pm25", *WINDOW, magnitude=10.0)
    _, untouched = apply_faults("no2", times, values, [fault], seed=1)
    np.testing.assert_array_equal(untouched, values)
    _, touched = apply_faults("no2", times, values, [Fault("drift", "*", *WINDOW)], seed=1)
    assert not np.array_equal(touched, values)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"kind": "melt", "metric": "no2", "start_ms": 0, "end_ms": 1}, "kind"),
        ({"kind": "stuck", "metric": "no2", "start_ms": 5, "end_ms": 5}, "end_ms"),
        ({"kind": "stuck", "metric": "no2", "start_ms": 0, "end_ms": 1, "when": 3}, "'when'"),
        ({"kind": "stuck", "metric": "no2", "end_ms": 1}, "'start_ms'"),
        (fault_spec("dropout", "no2", 0, 1, magnitude=2), "fraction"),
        ({"kind": "spike", "metric": "no2", "start_ms": 0, "end_ms": 1, "rate": 0}, "rate"),
        ({"kind": "spike", "metric": "no2", "start_ms": 0.5, "end_ms": 1}, "integer"),
    ],
)  # fmt: skip
def test_bad_fault_specs_are_refused_with_the_reason(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidSpecError, match=problem):
        parse_faults([spec])


def test_fault_dict_round_trip() -> None:
    faults = parse_faults(FAULT_SPECS)
    assert parse_faults([f.to_dict() for f in faults]) == faults
    assert parse_faults(None) == ()


def test_driver_applies_faults_only_in_their_window() -> None:
    start, end = MONDAY, MONDAY + DAY_MS
    clean = read_all(SimulatedDriver(seed=3, zone_profile=RING_ROAD, start_ms=start), end)
    dirty = read_all(
        SimulatedDriver(seed=3, zone_profile=RING_ROAD, start_ms=start, faults=FAULT_SPECS), end
    )
    # No fault on o3 except the all-metrics dropout between 10:00 and 11:00.
    times, values = dirty["o3"]
    gap = (clean["o3"][0] >= MONDAY + 10 * HOUR_MS) & (clean["o3"][0] < MONDAY + 11 * HOUR_MS)
    np.testing.assert_array_equal(times, clean["o3"][0][~gap])
    np.testing.assert_array_equal(values, clean["o3"][1][~gap])
    # The stuck pm25 holds the clean value of its first grid sample.
    t, v = dirty["pm25"]
    window = (t >= MONDAY + 5 * HOUR_MS + 7) & (t < MONDAY + 9 * HOUR_MS)
    first = MONDAY + 5 * HOUR_MS + INTERVAL
    assert np.all(v[window] == clean["pm25"][1][clean["pm25"][0] == first][0])


# ------------------------------------------------------------------------------ driver


def test_load_driver_with_city_device_options() -> None:
    city = SimulatedCity.generate(11, devices=12, zones=3)
    kinds = set()
    for device in city.devices:
        # driver_options are plain data (they travel through TOML/JSON config files).
        assert json.loads(json.dumps(device.driver_options)) == device.driver_options
        driver = load_driver("sim", dict(device.driver_options, start_ms=MONDAY))
        assert isinstance(driver, SensorDriver)
        assert driver.metrics == METRICS_BY_KIND[device.kind]
        assert driver.sample_interval_ms == INTERVAL
        blocks = driver.read(MONDAY + HOUR_MS)
        assert [b.metric for b in blocks] == list(driver.metrics)
        assert all(len(b.times_ms) == HOUR_MS // INTERVAL for b in blocks)
        driver.close()
        kinds.add(device.kind)
    assert "multi" in kinds


@pytest.mark.parametrize(
    "options",
    [
        {"seed": 1, "colour": "red"},
        {"seed": 1, "kind": "seismic"},
        {"seed": "1"},
        {"seed": 1, "zone_profile": {"traffic_intensity": 9.0}},
        {"seed": 1, "zone_profile": {"altitude": 3}},
        {"seed": 1, "kind": "air", "faults": [fault_spec("stuck", "occupancy", 0, 9)]},
    ],
)  # fmt: skip
def test_driver_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(DriverError, match="rejected its options"):
        load_driver("sim", options)


def test_week_of_samples_is_computed_in_one_go() -> None:
    # The edge agent replays outages in one read: a week must come back complete.
    driver = SimulatedDriver(seed=8, start_ms=MONDAY)
    blocks = driver.read(MONDAY + WEEK_MS)
    assert sum(len(b.values) for b in blocks) == 10 * 30_240


# -------------------------------------------------------------------------------- city


def point_in_polygon(lon: float, lat: float, ring: list[list[float]]) -> bool:
    hit = False
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if (y1 > lat) != (y2 > lat) and lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def signed_area(ring: list[list[float]]) -> float:
    return sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in itertools.pairwise(ring)) / 2


@pytest.mark.parametrize(("devices", "zones"), [(20, 4), (8, 4), (4, 2), (50, 12), (3, 5)])
def test_city_layout_guarantees(devices: int, zones: int) -> None:
    city = SimulatedCity.generate(21, devices=devices, zones=zones)
    assert len(city.zones) == zones
    assert len({z.name for z in city.zones}) == zones
    assert len(city.devices) == devices
    assert len({d.name for d in city.devices}) == devices
    per_zone = {z.name: [d for d in city.devices if d.zone == z.name] for z in city.zones}
    sizes = [len(found) for found in per_zone.values()]
    assert max(sizes) - min(sizes) <= 1, "devices are spread evenly"
    if devices >= 2 * zones:
        for name, found in per_zone.items():
            assert any(d.kind in ("air", "multi") for d in found), name
            assert any(d.kind in ("traffic", "multi") for d in found), name
    south, west, north, east = CITY_BOX
    geojson = json.loads(json.dumps(city.zones_geojson()))
    assert geojson["type"] == "FeatureCollection"
    assert [f["properties"]["name"] for f in geojson["features"]] == [z.name for z in city.zones]
    rings = {}
    for feature in geojson["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert signed_area(ring) > 0, "exterior rings run counter-clockwise (RFC 7946)"
        assert all(west <= lon <= east and south <= lat <= north for lon, lat in ring)
        rings[feature["properties"]["name"]] = ring
    for device in city.devices:
        assert point_in_polygon(device.lon, device.lat, rings[device.zone]), device.name
        others = [r for name, r in rings.items() if name != device.zone]
        assert not any(point_in_polygon(device.lon, device.lat, r) for r in others)


def test_city_is_deterministic_for_its_seed() -> None:
    a = SimulatedCity.generate(7)
    assert a == SimulatedCity.generate(7)
    assert a.to_dict() != SimulatedCity.generate(8).to_dict()
    assert [z.name for z in a.zones] == ["harbour", "old-town", "ring-road", "university"]
    ring_road, old_town = a.zone("ring-road"), a.zone("old-town")
    assert ring_road.traffic_intensity > old_town.traffic_intensity
    weather_seeds = {d.driver_options["zone_profile"]["weather_seed"] for d in a.devices}
    assert len(weather_seeds) == 1, "one city, one weather"


def test_city_refuses_impossible_sizes() -> None:
    with pytest.raises(InvalidSpecError):
        SimulatedCity.generate(1, devices=0)
    with pytest.raises(InvalidSpecError):
        SimulatedCity.generate(1, zones=0)


# --------------------------------------------------------------------------------- CLI


def test_cli_city_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    geojson = tmp_path / "zones.geojson"
    code = civicmesh_main(["sim", "city", "--seed", "3", "--devices", "6", "--zones", "3",
                           "--geojson", str(geojson)])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == SimulatedCity.generate(3, devices=6, zones=3).to_dict()
    assert len(json.loads(geojson.read_text())["features"]) == 3
    assert civicmesh_main(["sim", "sample", "--seed", "3", "--hours", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 6 and "vehicle_count" in lines[1]


# ------------------------------------------------------------------------------ replay

REPLAY_DIR = Path(
    os.environ.get(
        "CIVICMESH_REPLAY_DIR",
        Path(__file__).resolve().parents[2]
        / "shared/datasets/sensor_community_aberdeen/daily_files",
    )
)


@pytest.mark.skipif(not REPLAY_DIR.is_dir(), reason="Sensor.Community replay data not present")
def test_replay_of_real_archive_files() -> None:
    driver = load_driver(
        "firmware_sim.replay:ReplayDriver",
        {"data_dir": str(REPLAY_DIR), "sensor_ids": [15092, 15093], "start_ms": MONDAY},
    )
    assert driver.metrics == ("pm25", "pm10", "temperature", "relativehumidity")
    first = read_all(driver, MONDAY + DAY_MS)
    rest = read_all(driver, MONDAY + 8 * DAY_MS)
    assert min(int(t[0]) for t, _ in first.values()) == MONDAY
    # 2019-05-13T00:02:15 P1=8.97 P2=3.10, the first row of sensor 15092.
    assert first["pm10"][1][0] == 8.97 and first["pm25"][1][0] == 3.10
    assert first["temperature"][1][0] == 10.36 and first["relativehumidity"][1][0] == 86.74
    total = len(first["pm25"][0]) + len(rest["pm25"][0])
    assert 3_000 < total < 5_000
    assert driver.read(MONDAY + 9 * DAY_MS) == []
