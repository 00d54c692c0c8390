"""Network-wide drift detection (issue 23, part 3).

A small synthetic network (six devices within 2 km sharing one city-wide signal, each
with its own local noise and a local gain) checks the three cases the detector is built
for: one device drifting (an alarm naming it, its neighbours, the size and since when),
a city-wide change moving every device (no alarm), a device with a stable local offset
(no alarm). The same network goes through a real store and the command. The harness of
bench/calibration.py runs on a small slice of the real Aberdeen week.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from analytics.accounting.load import parse_day
from analytics.calibration import (
    DriftRule,
    Network,
    NetworkDevice,
    correction_for,
    detect_drift,
)
from analytics.calibration.drift import HOUR_MS
from analytics.calibration.load import load_network
from analytics.store import open_store
from analytics.store.base import StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.registry import IMPORT_KIND, DeviceRecord

DAY = "2026-11-24"  # the fifth day of the synthetic network: four days of baseline before
START = parse_day("2026-11-20")
HOURS = 144
CENTRE = (57.15, -2.10)
GATEWAY = Ed25519Signer.from_seed(hashlib.sha256(b"calibration/gw").digest())
DRIFT_HOUR = 98  # 02:00 on DAY
NAMES = ("a", "b", "c", "d", "e", "f")


def city_signal(hours: int, seed: int = 1) -> NDArray[np.float64]:
    """A city-wide PM2.5-like signal: diurnal cycle and slow weather swings."""
    t = np.arange(hours)
    rng = np.random.default_rng(seed)
    weather = np.cumsum(rng.normal(0, 0.08, hours))
    signal: NDArray[np.float64] = (
        8.0 * np.exp(weather - weather.mean()) * (1 + 0.4 * np.sin(2 * np.pi * (t - 7) / 24))
    )
    return signal


def synthetic(
    *,
    drift: str | None = None,
    city_change: float = 1.0,
    gains: dict[str, float] | None = None,
    reference: str | None = None,
) -> Network:
    base = city_signal(HOURS)
    if city_change != 1.0:  # from hour 70 on, everything the city breathes changes
        base = base * np.where(np.arange(HOURS) >= 90, city_change, 1.0)
    gains = gains or {}
    devices = []
    for k, name in enumerate(NAMES):
        rng = np.random.default_rng(100 + k)
        values = gains.get(name, 1.0) * base * np.exp(rng.normal(0, 0.08, HOURS))
        if name == drift:  # an offset growing 0.6 µg/m³ per hour from DRIFT_HOUR
            values = values + 0.6 * np.clip(np.arange(HOURS) - DRIFT_HOUR, 0, None)
        lat = CENTRE[0] + 0.004 * (k % 3)
        lon = CENTRE[1] + 0.006 * (k // 3)
        devices.append(NetworkDevice(f"dev-{name}", lat, lon, values, reference=name == reference))
    return Network("pm25", START, tuple(devices))


def test_a_drifting_device_alarms_with_its_evidence() -> None:
    network = synthetic(drift="c")
    alarms = detect_drift(network)
    assert {a.device_id for a in alarms} == {"dev-c"}, [a.to_dict() for a in alarms]
    alarm = alarms[0]
    assert alarm.direction == "up"
    assert alarm.start_hour >= DRIFT_HOUR
    assert DRIFT_HOUR - 3 <= alarm.since_hour <= DRIFT_HOUR + 6
    # x1.35 is reached after ~6 h; the 18-h running median and 4 h in a row add the rest
    assert alarm.start_hour - DRIFT_HOUR <= 24
    assert alarm.departure > 1.35
    named = [n.device_id for n in alarm.neighbours]
    assert sorted(named) == ["dev-a", "dev-b", "dev-d", "dev-e", "dev-f"]
    assert all(n.distance_km < 1.5 and not n.reference for n in alarm.neighbours)
    assert all(n.median_ratio > 1.3 for n in alarm.neighbours)
    # the correction brings the device back near its true values
    truth = synthetic().devices[2].values[alarm.start_hour :]
    drifted = network.devices[2].values[alarm.start_hour :]
    fixed = correction_for(network, alarm).corrected(drifted)
    assert np.mean(np.abs(fixed - truth)) < 0.35 * np.mean(np.abs(drifted - truth))


def test_a_city_wide_change_moving_every_device_raises_no_alarm() -> None:
    for change in (3.0, 0.3):
        network = synthetic(city_change=change)
        level = np.stack([d.values for d in network.devices])
        before = np.stack([d.values for d in synthetic().devices])
        moved = np.log(level[:, 95:] / before[:, 95:])
        assert np.allclose(moved, np.log(change))  # every device moved, by x3 or /3.3
        assert detect_drift(network) == []


def test_a_stable_local_offset_raises_no_alarm() -> None:
    network = synthetic(gains={"b": 1.8, "e": 0.6})  # a busy road, a sheltered garden
    assert detect_drift(network) == []
    # the same offset appearing suddenly on day four is a change, and is seen
    values = network.devices[1].values.copy()
    values[DRIFT_HOUR:] *= 2.0
    devices = list(network.devices)
    devices[1] = NetworkDevice("dev-b", devices[1].lat, devices[1].lon, values)
    assert [a.device_id for a in detect_drift(Network("pm25", START, tuple(devices)))] == ["dev-b"]


def test_a_pair_blames_the_device_whose_own_level_moved() -> None:
    network = synthetic(drift="a")
    pair = Network("pm25", START, network.devices[:2])
    assert {a.device_id for a in detect_drift(pair)} == {"dev-a"}


def test_references_count_as_neighbours_and_are_named() -> None:
    network = synthetic(drift="c", reference="f")
    alarm = detect_drift(network)[0]
    assert [n.device_id for n in alarm.neighbours if n.reference] == ["dev-f"]
    assert alarm.to_dict()["neighbours"][0]["distance_km"] >= 0


def test_the_detector_is_a_pure_function_and_checks_its_input() -> None:
    network = synthetic(drift="c")
    first = [a.to_dict() for a in detect_drift(network)]
    assert [a.to_dict() for a in detect_drift(network)] == first
    with pytest.raises(ValueError, match="drift detection covers"):
        Network("vehicle_count", START, network.devices)
    with pytest.raises(ValueError, match="radius_km must be a positive"):
        DriftRule(radius_km=0)
    lone = Network("pm25", START, network.devices[2:3])
    assert detect_drift(lone) == []  # no neighbour: nothing to say


# ----------------------------------------------------------- a real store, the command


def _batches(signer: Ed25519Signer, values: NDArray[np.float64]) -> list[StoredBatch]:
    out, prev = [], GENESIS_HASH
    for hour in range(0, HOURS, 12):  # a batch per 12 h, one reading per 10 minutes
        rows = [
            Reading(START + h * HOUR_MS + m * 600_000, "pm25", round(float(values[h]), 3))
            for h in range(hour, hour + 12)
            for m in range(6)
        ]
        sealed = START + (hour + 12) * HOUR_MS
        seq = hour // 12 + 1
        batch = seal_batch(signer, make_payload(signer.key_id, seq, prev, sealed, rows, "t"))
        envelope = wrap_envelope(GATEWAY, batch.message, sealed + 1_500)
        out.append(
            StoredBatch(
                device_id=batch.device_id,
                seq=seq,
                payload_hash=batch.hash,
                prev_hash=prev,
                sealed_at_ms=sealed,
                model_version="t",
                gateway_id=GATEWAY.key_id,
                received_at_ms=envelope.received_at_ms,
                ingested_at_ms=sealed + 2_000,
                device_message=batch.message,
                gateway_message=envelope.message,
                readings=batch.payload.readings,
            )
        )
        prev = batch.hash
    return out


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    network = synthetic(drift="c", reference="f")
    path = tmp_path_factory.mktemp("calibration") / "city.db"
    url = f"sqlite:///{path}"
    store = open_store(url)
    ids: dict[str, str] = {}
    try:
        store.migrate()
        for name, device in zip(NAMES, network.devices, strict=True):
            signer = Ed25519Signer.from_seed(hashlib.sha256(f"cal/{name}".encode()).digest())
            ids[device.device_id] = signer.key_id
            kind = IMPORT_KIND if device.reference else "air"
            record = DeviceRecord(
                signer.key_id,
                signer.verify_key().to_text(),
                "centre",
                device.lat,
                device.lon,
                kind,
                registered_at_ms=START - HOUR_MS,
            )
            store.upsert_devices([record])
            store.write_batches(_batches(signer, device.values))
    finally:
        store.close()
    return url, ids


def test_the_store_gives_the_hourly_table_back(store_url: tuple[str, dict[str, str]]) -> None:
    url, ids = store_url
    store = open_store(url)
    try:
        network = load_network(store, "pm25", START, START + HOURS * HOUR_MS)
    finally:
        store.close()
    expected = {ids[d.device_id]: d for d in synthetic(drift="c", reference="f").devices}
    assert {d.device_id for d in network.devices} == set(expected)
    for device in network.devices:
        np.testing.assert_allclose(device.values, expected[device.device_id].values, atol=1e-3)
        assert device.reference == expected[device.device_id].reference


def test_the_command_prints_the_alarm_and_refuses_bad_input(
    store_url: tuple[str, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from civicmesh import cli

    url, ids = store_url
    argv = ["calibration", "drift", "--day", DAY, "--database-url", url]
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [a["device_id"] for a in report["alarms"]] == [ids["dev-c"]]
    alarm = report["alarms"][0]
    assert alarm["direction"] == "up" and alarm["departure_factor"] > 1.35
    assert report["metrics"]["pm25"] == {"devices": 6, "with_neighbours": 6, "references": 1}
    assert [n["reference"] for n in alarm["neighbours"]].count(True) == 1
    assert 8 < alarm["correction"]["offset"] < 14  # 0.6/h over the 22 h of the day
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"{ids['dev-c']} pm25 drifting up since 2026-11-24" in text
    assert "reference" in text and "correction estimate: subtract" in text
    # the day before the drift: no alarm
    assert cli.main(["calibration", "drift", "--day", "2026-11-23", "--database-url", url]) == 0
    assert "No drift alarms." in capsys.readouterr().out
    assert cli.main(["calibration", "drift", "--day", "24-11-2026", "--database-url", url]) == 2
    assert "use YYYY-MM-DD" in capsys.readouterr().err
    assert cli.main([*argv, "--radius-km", "-1"]) == 2
    assert "--radius-km must be a positive" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    assert cli.main(["calibration", "drift", "--day", DAY, "--database-url", missing]) == 2
    assert "no store at" in capsys.readouterr().err


# ------------------------------------------------------------------ real data


def test_the_evaluation_harness_on_a_real_slice() -> None:
    bench = pytest.importorskip("bench.calibration")
    city = bench.load_city()
    split = bench.read_split()
    assert not set(split["tuning"]) & set(split["heldout"])
    assert set(split["tuning"]) | set(split["heldout"]) == set(city.devices)
    rule = DriftRule()
    # the injected drift really is on the real stream, at the planned size
    [episode] = bench.plan_episodes(city, ["sds011-5331"], 1, 7)[:1]
    drifted = bench.drifted_hourly(city, episode, 7)
    clean = city.hourly[(episode.device, episode.metric)]
    assert np.allclose(drifted[: episode.start_hour], clean[: episode.start_hour], equal_nan=True)
    assert np.nanmedian(drifted[-6:] - clean[-6:]) == pytest.approx(episode.magnitude, rel=0.01)
    devices = ["sds011-5331", "sds011-22549", "sds011-8554"]  # three tuning devices
    result = bench.evaluate(city, devices, rule, repeats=1)
    assert result["episodes"] == 6
    assert result["recall"] >= 0.5
    assert result["clean"]["per_device_day"] <= 1.0
    assert result["correction"]["episodes"] >= 1
    assert result["correction"]["corrected_mae"] < result["correction"]["uncorrected_mae"]
