"""HTTP API over a store filled with known, really sealed batches: every route, the error
cases, series numbers against a hand computation, and the OpenAPI document."""

from __future__ import annotations

import base64
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import (
    admin_url,
    create_database,
    drop_database,
    quiet_policy,
    relayed_batch,
    tsdb_admin_url,
)

from analytics.api import create_app
from analytics.store import open_store
from analytics.store.base import Store, StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import GENESIS_HASH, Reading
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from civicmesh.timeutil import now_ms

with warnings.catch_warnings():
    # Starlette >= 1.x prefers httpx2 for its test client and warns at import when only
    # httpx is installed; both work. (Add httpx2 to the dev extra to drop this.)
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, an hour boundary
TEN_MIN = 600_000
HOUR = 3_600_000


def signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"test_api/{name}".encode()).digest())


GATEWAY = signer("gateway")
A, B, C, D, IDLE = (signer(n) for n in ("a", "b", "c", "d", "idle"))
ZONES = {A: "north", B: "north", C: "south", D: "south", IDLE: "west"}


def stored(
    device: Ed25519Signer, seq: int, prev: bytes, readings: Sequence[Reading]
) -> StoredBatch:
    return relayed_batch(device, GATEWAY, seq, prev, readings)


def fill(store: Store, registry_path: Path) -> None:
    """Two hours of pm25 every 10 min for A (10+k) and B (20+2k), C constant 5, D now."""
    registry = Registry.empty().with_gateway(
        GatewayRecord(GATEWAY.key_id, GATEWAY.verify_key().to_text())
    )
    for index, (device, zone) in enumerate(ZONES.items()):
        registry = registry.with_device(
            DeviceRecord(device.key_id, device.verify_key().to_text(), zone, 52.0 + index, 13.0)
        )
    registry.save(registry_path)
    store.upsert_devices(registry.devices.values())

    batches = []
    for device, value in ((A, lambda k: 10.0 + k), (B, lambda k: 20.0 + 2 * k), (C, lambda k: 5.0)):
        prev = GENESIS_HASH
        for seq, hour in enumerate((0, 1), start=1):
            readings = [
                Reading(T0 + hour * HOUR + k * TEN_MIN, "pm25", value(hour * 6 + k))
                for k in range(6)
            ]
            readings.append(Reading(T0 + hour * HOUR, "temperature", 3.5 + hour))
            batch = stored(device, seq, prev, readings)
            batches.append(batch)
            prev = batch.payload_hash
    recent = now_ms() - 30_000
    batches.append(stored(D, 1, GENESIS_HASH, [Reading(recent, "no2", 41.0)]))
    store.write_batches(batches)
    store.refresh_rollups()
    store.add_quarantine(
        [
            QuarantineRecord.of(
                reason=f"reason.{i}",
                detail=f"record {i}",
                source="ingest:t",
                topic="civicmesh/v1/gw/x/up",
                received_at_ms=T0 + i,
                payload=bytes([i]),
            )
            for i in range(3)
        ]
    )


@pytest.fixture(
    scope="module",
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.integration),
        pytest.param("timescaledb", marks=[pytest.mark.integration, pytest.mark.timescaledb]),
    ],
)
def filled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, RegistryFile]]:
    tmp = tmp_path_factory.mktemp("api")
    server = tsdb_admin_url() if request.param == "timescaledb" else admin_url()
    url = f"sqlite:///{tmp / 'api.db'}" if request.param == "sqlite" else create_database(server)
    # The test data lie in 2023: no retention or compression jobs on TimescaleDB.
    store = open_store(url, timescaledb="off" if request.param == "postgresql" else "require",
                       policy=quiet_policy())  # fmt: skip
    try:
        store.migrate()
        fill(store, tmp / "registry.json")
        yield store, RegistryFile(tmp / "registry.json")
    finally:
        store.close()
        if request.param != "sqlite":
            drop_database(url, server)


@pytest.fixture(scope="module")
def stats() -> dict[str, Any]:
    return {"running": True, "store_ok": True, "written_batches": 7}


@pytest.fixture(scope="module")
def client(filled: tuple[Store, RegistryFile], stats: dict[str, Any]) -> Iterator[TestClient]:
    store, registry = filled
    app = create_app(store, registry=registry, stats_provider=lambda: dict(stats))
    with TestClient(app) as test_client:
        yield test_client


def get(client: TestClient, path: str, status: int = 200, **params: Any) -> Any:
    response = client.get(f"/api/v1{path}", params=params)
    assert response.status_code == status, response.text
    return response.json()


# ------------------------------------------------------------------------ routes


def test_health(
    client: TestClient, stats: dict[str, Any], filled: tuple[Store, RegistryFile]
) -> None:
    body = get(client, "/health")
    assert body["status"] == "ok"
    assert body["store_backend"] in ("sqlite", "postgresql", "timescaledb")
    assert body["store_backend"] == filled[0].backend
    assert body["counts"] == {"batches": 7, "readings": 3 * 2 * 7 + 1, "quarantined": 3}
    assert body["registry"] == {"devices": 5, "gateways": 1}
    assert body["ingest"]["written_batches"] == 7
    stats["store_ok"] = False
    try:
        assert get(client, "/health")["status"] == "degraded"
    finally:
        stats["store_ok"] = True


def test_devices(client: TestClient) -> None:
    devices = {d["device_id"]: d for d in get(client, "/devices")}
    assert set(devices) == {s.key_id for s in ZONES}
    a = devices[A.key_id]
    assert (a["zone"], a["lat"], a["lon"], a["status"], a["kind"]) == (
        "north",
        52.0,
        13.0,
        "active",
        "multi",
    )
    assert a["last_seq"] == 2 and a["batches"] == 2
    assert a["last_seen_ms"] == T0 + HOUR + 5 * TEN_MIN
    assert a["last_seen"] == "2026-01-01T01:50:00Z"
    assert a["online"] is False  # last seen long ago
    assert devices[D.key_id]["online"] is True  # a reading 30 s ago
    idle = devices[IDLE.key_id]
    assert (idle["last_seen"], idle["last_seq"], idle["batches"], idle["online"]) == (
        None,
        None,
        0,
        False,
    )


def test_zones(client: TestClient) -> None:
    zones = {z["zone"]: z for z in get(client, "/zones")}
    assert set(zones) == {"north", "south", "west"}
    assert zones["north"]["devices"] == 2
    assert zones["north"]["lat"] == pytest.approx((52.0 + 53.0) / 2)


def test_latest(client: TestClient) -> None:
    rows = get(client, "/latest", zone="north")
    got = {(r["device_id"], r["metric"]): (r["ts_ms"], r["value"], r["unit"]) for r in rows}
    assert got == {
        (A.key_id, "pm25"): (T0 + HOUR + 5 * TEN_MIN, 21.0, "µg/m³"),
        (A.key_id, "temperature"): (T0 + HOUR, 4.5, "°C"),
        (B.key_id, "pm25"): (T0 + HOUR + 5 * TEN_MIN, 42.0, "µg/m³"),
        (B.key_id, "temperature"): (T0 + HOUR, 4.5, "°C"),
    }
    everything = get(client, "/latest")
    assert len(everything) == 4 + 2 + 1  # north, C's two metrics, D's no2
    assert get(client, "/latest", 404, zone="atlantis")["detail"] == (
        "Unknown zone 'atlantis'; known zones: north, south, west"
    )


def test_series_matches_a_hand_computation(client: TestClient) -> None:
    body = get(
        client,
        "/series",
        metric="pm25",
        zone="north",
        start="2026-01-01T00:00:00Z",
        end="2026-01-01T02:00:00Z",
        bucket=3600,
    )
    assert (body["metric"], body["unit"], body["bucket_s"]) == ("pm25", "µg/m³", 3600)
    points = [(p["start"], p["count"], p["mean"], p["min"], p["max"]) for p in body["points"]]
    # Hour 0: A 10..15 (sum 75), B 20,22..30 (sum 150); hour 1: A 16..21 (111), B 32..42 (222).
    assert points == [
        ("2026-01-01T00:00:00Z", 12, pytest.approx(225 / 12), 10.0, 30.0),
        ("2026-01-01T01:00:00Z", 12, pytest.approx(333 / 12), 16.0, 42.0),
    ]
    # One device, 30-minute buckets within the first hour: A 10,11,12 and 13,14,15.
    body = get(
        client,
        "/series",
        metric="pm25",
        device=A.key_id,
        start="2026-01-01T00:00:00+00:00",
        end="2026-01-01T01:00:00+00:00",
        bucket=1800,
    )
    assert [(p["start_ms"], p["count"], p["mean"]) for p in body["points"]] == [
        (T0, 3, 11.0),
        (T0 + 1800_000, 3, 14.0),
    ]
    # The whole city, one bucket: A 10..21, B 20..42, C 5 x 12.
    body = get(
        client,
        "/series",
        metric="pm25",
        start="2026-01-01T00:00:00Z",
        end="2026-01-01T02:00:00Z",
        bucket=7200,
    )
    ((point,),) = [body["points"]]
    assert point["count"] == 36
    assert point["mean"] == pytest.approx((186 + 372 + 60) / 36)
    assert (point["min"], point["max"]) == (5.0, 42.0)


def test_series_from_rollups_matches_the_raw_answer(client: TestClient) -> None:
    window = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T02:00:00Z"}
    raw = get(client, "/series", metric="pm25", zone="north", bucket=3600, **window)
    hourly = get(client, "/series", metric="pm25", zone="north", resolution="1h", **window)
    assert (raw["resolution"], hourly["resolution"]) == ("raw", "1h")
    assert hourly["points"] == raw["points"]
    # auto: 120 one-minute buckets fit in 500 points; 2 hourly ones fit in 5.
    assert get(client, "/series", metric="pm25", **window)["resolution"] == "1m"
    auto = get(client, "/series", metric="pm25", points=5, **window)
    assert (auto["resolution"], auto["bucket_s"], len(auto["points"])) == ("1h", 3600, 2)
    assert sum(p["count"] for p in auto["points"]) == 36
    # A bucket belongs to the range by its start: the day of 2026-01-01 starts at `start`.
    daily = get(client, "/series", metric="pm25", resolution="1d", **window)
    assert [(p["start"], p["count"]) for p in daily["points"]] == [("2026-01-01T00:00:00Z", 36)]
    get(client, "/series", 422, metric="pm25", resolution="5m", **window)


def test_completeness_per_device_and_zone(client: TestClient) -> None:
    body = get(
        client,
        "/completeness",
        start="2026-01-01T00:00:00Z",
        end="2026-01-01T02:00:00Z",
        interval=600,
    )
    by_device = {r["device_id"]: r for r in body["devices"]}
    # A reports pm25 every 10 min (12) and temperature hourly (2): 14 of 2 x 12 expected.
    assert (by_device[A.key_id]["metrics"], by_device[A.key_id]["expected"]) == (2, 24)
    assert by_device[A.key_id]["received"] == 14
    assert by_device[D.key_id]["received"] == 0
    zones = {z["zone"]: z for z in body["zones"]}
    north = zones["north"]  # A and B, both reporting the same way
    assert (north["devices"], north["reporting"], north["expected"], north["received"]) == (
        2, 2, 48, 28,
    )  # fmt: skip
    only_north = get(client, "/completeness", zone="north", interval=600)
    assert {r["zone"] for r in only_north["devices"]} == {"north"}
    get(client, "/completeness", 404, zone="atlantis")


def test_zone_and_city_aggregates(client: TestClient) -> None:
    window = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T02:00:00Z"}
    hourly = get(client, "/aggregates", **window)
    raw = get(client, "/aggregates", resolution="raw", **window)
    assert (hourly["resolution"], raw["resolution"]) == ("1h", "raw")
    assert hourly["aggregates"] == raw["aggregates"]
    city_pm25 = next(a for a in raw["aggregates"] if a["zone"] is None and a["metric"] == "pm25")
    assert city_pm25["count"] == 36
    assert city_pm25["mean"] == pytest.approx((186 + 372 + 60) / 36)
    north = next(a for a in raw["aggregates"] if a["zone"] == "north" and a["metric"] == "pm25")
    assert (north["count"], north["min"], north["max"]) == (24, 10.0, 42.0)
    get(client, "/aggregates", 422, resolution="5m", **window)


def test_prometheus_metrics(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "civicmesh_ingest_written_batches_total" in response.text
    assert 'civicmesh_ingest_written_batches_total{worker=""} 7.0' in response.text


def test_series_defaults_to_the_last_24_hours(client: TestClient) -> None:
    body = get(client, "/series", metric="no2", device=D.key_id)
    assert [p["count"] for p in body["points"]] == [1]
    assert body["points"][0]["mean"] == 41.0
    assert get(client, "/series", metric="pm25", zone="north")["points"] == []  # January is old


def test_series_errors_name_the_known_values(client: TestClient) -> None:
    detail = get(client, "/series", 422, metric="pm3")["detail"]
    assert detail.startswith("Unknown metric 'pm3'; known metrics: pm25, pm10, no2, o3, co,")
    assert "occupancy" in detail
    detail = get(client, "/series", 404, metric="pm25", zone="atlantis")["detail"]
    assert detail == "Unknown zone 'atlantis'; known zones: north, south, west"
    detail = get(client, "/series", 404, metric="pm25", device="nosuchdevice")["detail"]
    assert detail.startswith("Unknown device 'nosuchdevice'; known devices: ")
    assert A.key_id in detail
    detail = get(
        client,
        "/series",
        422,
        metric="pm25",
        start="2026-01-02T00:00:00Z",
        end="2026-01-01T00:00:00Z",
    )["detail"]
    assert detail == "start must be before end"
    get(client, "/series", 422, metric="pm25", bucket=10)  # below the 60 s bound
    # a request the API cannot read is one line that says what to write (a new user got
    # pydantic's list of error objects)
    bad = get(client, "/series", 422, metric="pm25", start="yesterday")
    assert bad["detail"] == "start: not a date and time; write ISO 8601, e.g. 2026-12-08T09:00:00Z"
    assert bad["errors"][0]["loc"] == ["query", "start"]  # the objects, for programs
    bad = get(client, "/series", 422, metric="pm25", resolution="5m", start="2026-01-01")
    assert bad["detail"] == "resolution: must be one of auto, 1m, 1h, 1d"
    assert get(client, "/series", 422)["detail"] == "metric: required"
    assert (
        "not both" in get(client, "/series", 422, metric="pm25", zone="north", device="x")["detail"]
    )
    assert (
        "limit is 10000"
        in get(client, "/series", 422, metric="pm25", start="2000-01-01T00:00:00Z", bucket=60)[
            "detail"
        ]
    )


def test_ledger_lets_anyone_reverify(
    client: TestClient, filled: tuple[Store, RegistryFile]
) -> None:
    from civicmesh.protocol import open_batch, open_envelope

    _, registry = filled
    entries = get(client, f"/ledger/{A.key_id}")
    assert [e["seq"] for e in entries] == [1, 2]
    prev = GENESIS_HASH.hex()
    for entry in entries:
        envelope = open_envelope(
            base64.b64decode(entry["gateway_message_b64"]), registry.gateway_key
        )
        assert envelope.gateway_id == entry["gateway_id"] == GATEWAY.key_id
        assert envelope.device_message == base64.b64decode(entry["device_message_b64"])
        batch = open_batch(envelope.device_message, registry.device_key)
        assert batch.hash.hex() == entry["payload_hash"]
        assert entry["prev_hash"] == prev
        prev = entry["payload_hash"]
        assert entry["readings"] == 7
        assert entry["received_at"].endswith("Z")
    assert [e["seq"] for e in get(client, f"/ledger/{A.key_id}", after_seq=1)] == [2]
    assert [e["seq"] for e in get(client, f"/ledger/{A.key_id}", limit=1)] == [1]
    get(client, f"/ledger/{A.key_id}", 422, limit=0)
    get(client, f"/ledger/{A.key_id}", 422, after_seq=-1)
    assert "Unknown device 'zzz'" in get(client, "/ledger/zzz", 404)["detail"]


def test_quarantine(client: TestClient) -> None:
    records = get(client, "/quarantine")
    assert [r["reason"] for r in records] == ["reason.2", "reason.1", "reason.0"]
    assert records[0]["payload_b64"] == base64.b64encode(b"\x02").decode()
    assert records[0]["received_at_ms"] == T0 + 2
    assert len(get(client, "/quarantine", limit=2)) == 2
    get(client, "/quarantine", 422, limit=0)
    get(client, "/quarantine", 422, limit=1001)


def test_openapi_document(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    for route in ("health", "devices", "zones", "latest", "series", "quarantine"):
        assert f"/api/v1/{route}" in paths
    assert "/api/v1/ledger/{device_id}" in paths
    series = paths["/api/v1/series"]["get"]
    bucket = next(p for p in series["parameters"] if p["name"] == "bucket")
    (bounded,) = [s for s in bucket["schema"]["anyOf"] if s.get("type") == "integer"]
    assert (bounded["minimum"], bounded["maximum"]) == (60, 31 * 24 * 3600)
    assert "pm25" in next(p for p in series["parameters"] if p["name"] == "metric")["description"]
    ok = series["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/SeriesOut"}
    assert "online" in schema["components"]["schemas"]["DeviceOut"]["properties"]


def test_store_failure_is_a_503(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'gone.db'}")
    store.migrate()
    store.close()  # every call now raises StoreError, as with the database down
    with TestClient(create_app(store)) as test_client:
        response = test_client.get("/api/v1/devices")
    assert response.status_code == 503
    assert response.json()["detail"].startswith("The store is unavailable")
