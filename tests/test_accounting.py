"""Contributor accounting (issue 22, part 1): quality scores and gaming checks.

One simulated city-day is written the way ingest writes it (sealed, signed, relayed
batches) into a real store, with one device per fault or gaming case; the scenarios were
written before the thresholds were tuned. The real Sensor.Community week checks that a
known real fault (the DHT22 humidity stuck at its 99.9 % ceiling) costs the hours it
covers and no others.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from analytics.accounting import AccountingRule, DayScores, DeviceDay, MetricSeries, score_day
from analytics.accounting.cli import render_text
from analytics.accounting.load import load_day, parse_day
from analytics.accounting.model import DAY_MS, HOUR_MS
from analytics.store import open_store
from analytics.store.base import Store, StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.registry import DeviceRecord, Registry
from firmware_sim.city import SimulatedCity
from firmware_sim.driver import AIR_METRICS, signal_params
from firmware_sim.faults import Fault, apply_faults
from firmware_sim.signals import simulate

DAY = "2026-11-20"
D0 = parse_day(DAY)
MIN = 60_000
GATEWAY = Ed25519Signer.from_seed(hashlib.sha256(b"accounting/gw").digest())
CENTRE = (57.1497, -2.0943)  # Aberdeen
FARM_METRICS = ("pm25", "temperature")
CITY = SimulatedCity.generate(22, devices=4, zones=1)
PROFILE = CITY.zones[0].profile(CITY.weather_seed, 0)


def at(hh: int, mm: int = 0) -> int:
    return D0 + hh * HOUR_MS + mm * MIN


@dataclass
class SimNode:
    """One simulated device of the scenario and how it misbehaves."""

    name: str
    seed: int
    lat: float
    lon: float
    owner: str
    metrics: tuple[str, ...] = AIR_METRICS
    faults: tuple[Fault, ...] = ()
    copy_of: str | None = None  # republish this node's stream ...
    copy_lag_min: int = 0  # ... this many minutes late ...
    copy_noise: float = 0.0  # ... with Gaussian noise of this many x the metric's step sd
    clock_offset_ms: int = 0  # device clock minus true time
    flagged: tuple[str, int, int, int] | None = None  # (metric, from, to, Quality bits)
    drained_at: tuple[int, int] | None = None  # batches sealed in (from, to] arrive at `to`
    batch_hours: int = 1  # each batch holds this many hours of readings
    signer: Ed25519Signer = field(init=False)

    def __post_init__(self) -> None:
        self.signer = Ed25519Signer.from_seed(hashlib.sha256(f"acc/{self.name}".encode()).digest())

    @property
    def device_id(self) -> str:
        return self.signer.key_id


def offset(dlat_km: float, dlon_km: float) -> tuple[float, float]:
    return CENTRE[0] + dlat_km / 111.2, CENTRE[1] + dlon_km / (111.2 * 0.543)


def scenario() -> list[SimNode]:
    """Written before any threshold was tuned; see the module docstring."""
    ring = [offset(1.2 * np.cos(a), 1.2 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 7)[:6]]
    nodes = [SimNode(f"clean-{i}", 100 + i, *ring[i], owner=f"op-{i}") for i in range(6)]
    nodes += [
        SimNode(
            "stuck",
            201,
            *offset(0.3, 0.0),
            owner="op-stuck",
            faults=(Fault("stuck", "pm25", at(3), at(7, 10)),),
        ),
        SimNode(
            "offline",
            202,
            *offset(-0.3, 0.2),
            owner="op-offline",
            faults=(Fault("dropout", "*", at(12), at(24), magnitude=1.0),),
        ),
        SimNode(
            "copy",
            0,
            *offset(0.1, -0.6),
            owner="op-copy",
            copy_of="clean-0",
            copy_lag_min=7,
            copy_noise=0.5,
        ),
        SimNode("clock", 204, *offset(-0.5, -0.4), owner="op-clock", clock_offset_ms=-2 * HOUR_MS),
        SimNode(
            "spiky",
            205,
            *offset(0.6, 0.5),
            owner="op-spiky",
            faults=(Fault("spike", "pm10", at(9), at(15), magnitude=600.0, rate=0.05),),
        ),
        SimNode(
            "drained",
            207,
            *offset(0.9, -0.3),
            owner="op-drained",
            drained_at=(at(9), at(15)),
            batch_hours=3,
        ),
        SimNode(
            "flagged",
            206,
            *offset(-0.8, 0.6),
            owner="op-flagged",
            flagged=("no2", at(5), at(7), int(Quality.DRIFT)),
        ),
    ]
    farm_at = offset(2.0, 1.0)
    nodes += [
        SimNode(
            f"farm-{i:02d}",
            300 + i,
            farm_at[0] + i * 1e-5,
            farm_at[1],
            owner="farm-op",
            metrics=FARM_METRICS,
        )
        for i in range(20)
    ]
    return nodes


def true_series(node: SimNode, times: NDArray[np.int64]) -> dict[str, NDArray[np.float64]]:
    values = simulate(signal_params(node.seed, PROFILE, MIN), times, node.metrics)
    return {m: np.asarray(values[m], dtype=np.float64) for m in node.metrics}


def readings_of(node: SimNode, by_name: dict[str, SimNode]) -> list[Reading]:
    stamps = np.arange(D0, D0 + DAY_MS, MIN, dtype=np.int64)  # the device clock's minutes
    true_times = stamps - node.clock_offset_ms
    rows: list[Reading] = []
    if node.copy_of is not None:
        source = by_name[node.copy_of]
        shifted = true_series(source, true_times - node.copy_lag_min * MIN)
        noise = np.random.default_rng(node.seed)
        for metric, clean in shifted.items():
            step = float(np.std(np.diff(clean)))
            noisy = clean + node.copy_noise * step * noise.standard_normal(clean.size)
            rows += [
                Reading(int(t), metric, round(float(v), 3))
                for t, v in zip(stamps, noisy, strict=True)
            ]
        return rows
    for metric, values in true_series(node, true_times).items():
        t, v = apply_faults(metric, stamps, values, node.faults, node.seed)
        flags = np.zeros(t.size, dtype=np.int64)
        if node.flagged is not None and node.flagged[0] == metric:
            flags[(t >= node.flagged[1]) & (t < node.flagged[2])] = node.flagged[3]
        rows += [
            Reading(int(a), metric, round(float(b), 3), int(q))
            for a, b, q in zip(t, v, flags, strict=True)
        ]
    return rows


def batches_of(node: SimNode, readings: Sequence[Reading]) -> list[StoredBatch]:
    """One batch per ``batch_hours`` of device-clock time, sealed at its end by the device
    clock and received 1.5 s later by the gateway's (true) clock (or when drained)."""
    out, prev = [], GENESIS_HASH
    by_hour: dict[int, list[Reading]] = {}
    for r in readings:
        by_hour.setdefault((r.ts_ms - D0) // (node.batch_hours * HOUR_MS), []).append(r)
    for seq, hour in enumerate(sorted(by_hour), start=1):
        sealed = D0 + (hour + 1) * node.batch_hours * HOUR_MS
        payload = make_payload(node.device_id, seq, prev, sealed, by_hour[hour], "sim-acc")
        batch = seal_batch(node.signer, payload)
        received = sealed - node.clock_offset_ms + 1_500
        if node.drained_at is not None and node.drained_at[0] < sealed <= node.drained_at[1]:
            received = node.drained_at[1] + 30_000  # the outbox drains after the outage
        envelope = wrap_envelope(GATEWAY, batch.message, received)
        out.append(
            StoredBatch(
                device_id=batch.device_id,
                seq=seq,
                payload_hash=batch.hash,
                prev_hash=prev,
                sealed_at_ms=sealed,
                model_version="sim-acc",
                gateway_id=GATEWAY.key_id,
                received_at_ms=envelope.received_at_ms,
                ingested_at_ms=received + 400,
                device_message=batch.message,
                gateway_message=envelope.message,
                readings=batch.payload.readings,
            )
        )
        prev = batch.hash
    return out


def records(nodes: Sequence[SimNode]) -> list[DeviceRecord]:
    return [
        DeviceRecord(
            n.device_id,
            n.signer.verify_key().to_text(),
            "centre",
            n.lat,
            n.lon,
            "air",
            registered_at_ms=D0 - DAY_MS + i,
            owner=n.owner,
        )
        for i, n in enumerate(nodes)
    ]


def fill(store: Store, nodes: Sequence[SimNode]) -> None:
    by_name = {n.name: n for n in nodes}
    store.upsert_devices(records(nodes))
    for node in nodes:
        store.write_batches(batches_of(node, readings_of(node, by_name)))


@dataclass
class City:
    nodes: dict[str, SimNode]
    registry: Registry
    store_url: str
    scores: DayScores

    def of(self, name: str) -> tuple[float, list[str], str]:
        score = self.scores.device(self.nodes[name].device_id)
        return score.score, [loss.text(D0) for loss in score.losses], score.not_rewarded_because


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[City]:
    nodes = scenario()
    path = tmp_path_factory.mktemp("accounting") / "city.db"
    url = f"sqlite:///{path}"
    store = open_store(url)
    try:
        store.migrate()
        fill(store, nodes)
        registry = Registry({r.device_id: r for r in records(nodes)}, {})
        scores = score_day(load_day(store, D0, registry), D0)
    finally:
        store.close()
    yield City({n.name: n for n in nodes}, registry, url, scores)


# ----------------------------------------------------------------- the simulated city


def test_clean_device_days_score_at_least_095_and_are_rewarded(city: City) -> None:
    for name in [f"clean-{i}" for i in range(6)]:
        score, losses, why = city.of(name)
        assert score >= 0.95, (name, score, losses)
        assert why == "", (name, why)
        assert not any("neighbours" in text or "duplicate" in text for text in losses), losses


def test_stuck_values_are_explained_with_their_time_span(city: City) -> None:
    score, losses, _ = city.of("stuck")
    assert losses[0].startswith("pm25 stuck 03:00-07:10"), losses
    # 4 h 10 min of one metric out of seven: about 0.025 of the day
    assert 0.02 < 1 - score < 0.035, (score, losses)


def test_a_device_offline_half_the_day_scores_half(city: City) -> None:
    score, losses, why = city.of("offline")
    assert losses[0].startswith("offline 12:00-24:00"), losses
    assert 0.45 < score < 0.52
    assert why == ""  # it earns for the half it delivered


def test_a_copied_stream_shifted_and_noisy_is_flagged_with_its_original(city: City) -> None:
    score, losses, why = city.of("copy")
    original = city.nodes["clean-0"].device_id
    assert score == 0.0
    assert why == f"duplicate stream of {original}"
    expected = f"duplicate (republishes {original} (pm25, 7 min behind"
    assert any(text.startswith(expected) for text in losses), losses
    assert city.scores.device(original).rewarded  # the original keeps its reward


def test_twenty_devices_of_one_operator_in_one_cell_are_capped(city: City) -> None:
    farm = [
        city.scores.device(node.device_id)
        for name, node in city.nodes.items()
        if name.startswith("farm-")
    ]
    assert len({d.cell for d in farm}) == 1
    rewarded = [d for d in farm if d.rewarded]
    assert len(rewarded) == 1
    for d in farm:
        if not d.rewarded:
            why = "capped: operator 'farm-op' has 20 devices in cell"
            assert d.not_rewarded_because.startswith(why)
            assert d.score >= 0.95  # capped is not a quality judgement


def test_a_clock_two_hours_off_loses_its_hours(city: City) -> None:
    score, losses, _ = city.of("clock")
    assert score == 0.0
    assert losses == ["clock 00:00-24:00 (device clock -2:00 vs receive time): -1.000"]


def test_an_outbox_draining_after_an_outage_is_no_clock_skew(city: City) -> None:
    score, losses, _ = city.of("drained")
    assert score >= 0.95, losses
    assert not any(text.startswith("clock") for text in losses)


def test_spikes_and_edge_flags_cost_their_readings_only(city: City) -> None:
    score, losses, _ = city.of("spiky")
    assert losses[0].startswith("pm10 jump 09:"), losses
    assert score > 0.95
    score, losses, _ = city.of("flagged")
    assert losses[0].startswith("no2 flagged 05:00-07:00 (120 readings flagged faulty by the edge)")
    assert abs((1 - score) - 2 / 24 / 7) < 0.003


def test_every_lost_point_is_explained_exactly_once(city: City) -> None:
    for device in city.scores.devices:
        lost = sum(loss.points for loss in device.losses)
        assert abs(lost - (1 - device.score)) < 1e-9, (device.device_id, device.losses)
        assert abs(device.score - sum(device.hourly) / 24) < 1e-9


def test_scores_are_a_pure_function_of_the_data(city: City) -> None:
    store = open_store(city.store_url)
    try:
        again = score_day(load_day(store, D0, city.registry), D0)
        assert json.dumps(again.to_dict()) == json.dumps(city.scores.to_dict())
        assert again.rule_id.startswith("acc-1+")
        # a changed parameter is a different rule: its id says so
        other = score_day(load_day(store, D0, city.registry), D0, AccountingRule(cell_cap=5))
        assert other.rule_id != again.rule_id
    finally:
        store.close()


def test_cli_and_api_serve_the_same_scores(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastapi.testclient import TestClient

    from analytics.api import create_app
    from civicmesh import cli
    from civicmesh.registry import RegistryFile

    registry_path = tmp_path / "registry.json"
    city.registry.save(registry_path)
    argv = ["accounting", "score", "--day", DAY, "--json", "--database-url", city.store_url]
    assert cli.main([*argv, "--registry", str(registry_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(city.scores.to_dict()))
    wrong_day = ["accounting", "score", "--day", "20-11-2026", "--database-url", city.store_url]
    assert cli.main(wrong_day) == 2
    assert "use YYYY-MM-DD" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nowhere.db'}"
    assert cli.main(["accounting", "score", "--day", DAY, "--database-url", missing]) == 2
    assert "no store at" in capsys.readouterr().err

    copy = tmp_path / "copy.db"  # the API test writes one more batch: a private copy
    shutil.copy(city.store_url[len("sqlite:///") :], copy)
    store = open_store(f"sqlite:///{copy}")
    try:
        app = create_app(store, registry=RegistryFile(registry_path))
        with TestClient(app) as client:
            answer = client.get("/api/v1/accounting/scores", params={"day": DAY})
            assert answer.status_code == 200
            assert answer.json() == printed
            bad = client.get("/api/v1/accounting/scores", params={"day": "yesterday"})
            assert bad.status_code == 422
            assert "use YYYY-MM-DD" in bad.json()["detail"]
            # a late batch (the offline device's 12:00 hour) changes the answer
            node = city.nodes["offline"]
            minutes = np.arange(at(12), at(13), MIN, dtype=np.int64)
            pm25 = true_series(node, minutes)["pm25"]
            late = [Reading(int(t), "pm25", float(v)) for t, v in zip(minutes, pm25, strict=True)]
            previous = store.ledger(node.device_id)[-1]
            batch = batches_of(node, late)[0]
            payload = make_payload(
                node.device_id, previous.seq + 1, previous.payload_hash, at(13), late, "sim-acc"
            )
            sealed = seal_batch(node.signer, payload)
            envelope = wrap_envelope(GATEWAY, sealed.message, at(13) + 1_500)
            outcome = store.write_batches(
                [
                    replace(
                        batch,
                        seq=previous.seq + 1,
                        prev_hash=previous.payload_hash,
                        payload_hash=sealed.hash,
                        device_message=sealed.message,
                        gateway_message=envelope.message,
                        readings=sealed.payload.readings,
                    )
                ]
            )
            assert [o.value for o in outcome] == ["inserted"]
            after = client.get("/api/v1/accounting/scores", params={"day": DAY}).json()
            before_score = {d["device_id"]: d["score"] for d in printed["devices"]}
            after_score = {d["device_id"]: d["score"] for d in after["devices"]}
            assert after_score[node.device_id] > before_score[node.device_id]
    finally:
        store.close()
    text = render_text(city.scores)
    assert "pm25 stuck 03:00-07:10" in text


# ------------------------------------------------------------------ real data


SC_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sensor_community_aberdeen"


def sensor_community_day(day: str) -> list[DeviceDay]:
    from firmware_sim.replay import load_series

    start = parse_day(day)
    index = (SC_DIR / "sensors_index_DERIVED.csv").read_text().splitlines()[1:]
    devices, seen = [], set()
    for line in index:
        sensor_id, sensor_type, _loc, lat, lon = line.split(",")
        if sensor_id in seen:
            continue  # sensor 22068 moved during the week: its first location is kept
        seen.add(sensor_id)
        series = {}
        for metric, (times, values) in load_series(SC_DIR / "daily_files", int(sensor_id)).items():
            t = np.asarray(times, dtype=np.int64)
            v = np.asarray(values, dtype=np.float64)
            keep = (t >= start) & (t < start + DAY_MS)
            series[metric] = MetricSeries(t[keep], v[keep], np.zeros(int(keep.sum()), np.int64))
        devices.append(
            DeviceDay(
                f"sc-{sensor_id}",
                f"loc-{_loc}",
                sensor_type.lower(),
                float(lat),
                float(lon),
                0,
                series,
            )
        )
    return devices


@pytest.mark.skipif(not SC_DIR.is_dir(), reason="needs ../shared/datasets (see its README)")
def test_real_stuck_dht22_humidity_costs_exactly_its_hours() -> None:
    devices = sensor_community_day("2019-05-15")
    scores = score_day(devices, parse_day("2019-05-15"))
    checked = 0
    for dev in devices:
        rh = dev.series.get("relativehumidity")
        if rh is None or rh.times.size == 0:
            continue
        score = scores.device(dev.device_id)
        at_ceiling = rh.values >= 99.9
        hours = (rh.times - parse_day("2019-05-15")) // HOUR_MS
        stuck_hours = set()
        # an hour fully inside a >= 1 h run of 99.9 must lose its humidity share
        for h in range(24):
            in_hour = hours == h
            if in_hour.sum() >= 20 and at_ceiling[in_hour].all():
                stuck_hours.add(h)
        stuck = [x for x in score.losses if x.check == "stuck" and x.metric == "relativehumidity"]
        if stuck_hours:
            checked += 1
            assert stuck, (dev.device_id, score.losses)
            for h in stuck_hours:
                assert score.hourly[h] <= 0.5 + 1e-9, (dev.device_id, h, score.hourly)
        # a stuck span is the ceiling (an odd glitch inside it is blamed on the jump
        # check), and an hour without a ceiling reading loses nothing to it
        for loss in stuck:
            for a, b in loss.intervals:
                inside = (rh.times >= a) & (rh.times <= b - 150_000)
                assert at_ceiling[inside].mean() >= 0.9, (dev.device_id, a, b)
                touched = set(hours[inside].tolist())
                assert all(at_ceiling[hours == h].any() for h in touched)
    assert checked >= 3  # the data set has several stuck DHT22s that day


@pytest.mark.integration
def test_postgresql_store_gives_the_same_scores(city: City, pg_database: str) -> None:
    store = open_store(pg_database, timescaledb="off")
    try:
        store.migrate()
        fill(store, list(city.nodes.values()))
        scores = score_day(load_day(store, D0, city.registry), D0)
    finally:
        store.close()
    assert scores.to_dict() == city.scores.to_dict()
