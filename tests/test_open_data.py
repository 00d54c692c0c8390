"""Open data: the OpenAQ v3-compatible routes driven by the official ``openaq`` SDK from
PyPI against a real uvicorn server (HTTPS: the SDK's transport speaks nothing else), and
the streamed CSV export from the API and ``civicmesh export``, over a store filled with a
simulated week of really sealed batches through the store's write path."""

from __future__ import annotations

import csv
import hashlib
import io
import ssl
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from openaq import OpenAQ
from openaq.core.exceptions import NotAuthorizedError, NotFoundError, RateLimitError
from support import (
    admin_url,
    create_database,
    drop_database,
    free_port,
    quiet_policy,
    relayed_batch,
)

from analytics.api import create_app
from analytics.api.openaq import METRIC_SLOTS, location_id, parameter_id, sensor_id
from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
from analytics.export import ExportRequest, csv_chunks
from analytics.store import open_store
from analytics.store.base import Resolution, Store, StoredBatch
from civicmesh import pki
from civicmesh.cli import main as civicmesh_main
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.protocol import GENESIS_HASH, Reading
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday
TEN_MIN = 600_000
HOUR = 3_600_000
DAY = 24 * HOUR
WEEK = 7 * DAY
PER_WEEK = WEEK // TEN_MIN  # 1008 readings per device and metric


def signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"test_open_data/{name}".encode()).digest())


GATEWAY = signer("gateway")
A, B, C = signer("a"), signer("b"), signer("c")
# A station brought in from an archive by `civicmesh import` (device kind "import").
IMPORTED = signer("imported")
# A and B in the centre, 1.4 km apart; C 19 km south-west.
PLACES = {
    A: ("north", 52.5200, 13.4050),
    B: ("north", 52.5300, 13.4200),
    C: ("south", 52.40, 13.20),
}
OFFSET = {A: 0.0, B: 100.0, C: 200.0}


def pm25(device: Ed25519Signer, k: int) -> float:
    return OFFSET[device] + 10.0 + (k % 37) * 0.5


def quality(k: int) -> int:
    return int(Quality.STUCK | Quality.SIMULATED) if k % 97 == 0 else 0


def sealed(device: Ed25519Signer, seq: int, prev: bytes, readings: list[Reading]) -> StoredBatch:
    return relayed_batch(device, GATEWAY, seq, prev, readings)


def fill(store: Store) -> None:
    """A week of pm25 and no2 every 10 min for A, B, C: a batch every 6 hours each."""
    registry = Registry.empty().with_gateway(
        GatewayRecord(GATEWAY.key_id, GATEWAY.verify_key().to_text())
    )
    for device, (zone, lat, lon) in PLACES.items():
        registry = registry.with_device(
            DeviceRecord(device.key_id, device.verify_key().to_text(), zone, lat, lon)
        )
    registry = registry.with_device(
        DeviceRecord(
            IMPORTED.key_id, IMPORTED.verify_key().to_text(), "south", 48.0, 11.0, kind="import"
        )
    )
    store.upsert_devices(registry.devices.values())
    archive = [Reading(T0 + k * TEN_MIN, "pm25", 7.0 + k) for k in range(6)]
    batches = [sealed(IMPORTED, 1, GENESIS_HASH, archive)]
    per_batch = 36
    for device in PLACES:
        prev = GENESIS_HASH
        for seq, first in enumerate(range(0, PER_WEEK, per_batch), start=1):
            readings = []
            for k in range(first, first + per_batch):
                ts = T0 + k * TEN_MIN
                readings.append(Reading(ts, "pm25", pm25(device, k), quality(k)))
                readings.append(Reading(ts, "no2", 30.0 + k % 11))
            batch = sealed(device, seq, prev, readings)
            batches.append(batch)
            prev = batch.payload_hash
    store.write_batches(batches)
    store.refresh_rollups()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]
)
def filled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, str]]:
    tmp = tmp_path_factory.mktemp("opendata")
    url = f"sqlite:///{tmp / 'open.db'}" if request.param == "sqlite" else create_database()
    opened = open_store(url, timescaledb="off", policy=quiet_policy())
    try:
        opened.migrate()
        fill(opened)
        yield opened, url
    finally:
        opened.close()
        if request.param != "sqlite":
            drop_database(url, admin_url())


@pytest.fixture(scope="module")
def store(filled: tuple[Store, str]) -> Store:
    return filled[0]


@dataclass
class Server:
    url: str  # https://127.0.0.1:port
    token: str
    ca: Path
    app: Any
    store: Store

    def sdk(self, **options: Any) -> OpenAQ:
        # The SDK insists on a 64-hex-digit OpenAQ key (sent as X-API-Key, which
        # civicmesh ignores); the civicmesh token goes in the Authorization header.
        return OpenAQ(
            api_key="0" * 64,
            base_url=f"{self.url}/openaq/v3/",
            headers={"Authorization": f"Bearer {self.token}"},
            **options,
        )

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def server(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The API over HTTPS with a site CA's certificate (``civicmesh pki``), tokens on."""
    tmp = tmp_path_factory.mktemp("openaq-server")
    ca = pki.init_ca(tmp / "pki")
    key, cert = pki.issue(tmp / "pki", "api", server=True, hosts=("127.0.0.1",))
    tokens = TokenFile(tmp / "tokens.json")
    token = tokens.add("sdk", "viewer")
    app = create_app(
        store, window_s=600, security=ApiSecurity(tokens, RateLimiter(rate=200.0, burst=500))
    )
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as patch:
        # The SDK's transport is http.client.HTTPSConnection with the default context:
        # it trusts what OpenSSL's SSL_CERT_FILE names, here the site CA.
        patch.setenv("SSL_CERT_FILE", str(ca))
        try:
            deadline = datetime.now() + timedelta(seconds=20)
            while not uv.started:
                assert thread.is_alive() and datetime.now() < deadline, "uvicorn did not start"
                threading.Event().wait(0.02)
            yield Server(f"https://127.0.0.1:{port}", token, ca, app, store)
        finally:
            uv.should_exit = True
            thread.join(10)


def ids(device: Ed25519Signer, metric: str = "pm25") -> tuple[int, int]:
    lid = location_id(device.key_id)
    return lid, sensor_id(lid, metric)


def iso(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# ------------------------------------------------------------------ the OpenAQ SDK


def test_sdk_lists_locations_and_searches_by_area(server: Server) -> None:
    with server.sdk() as client:
        everything = client.locations.list(limit=1000)
        assert everything.meta.found == 4
        by_id = {loc.id: loc for loc in everything.results}
        assert set(by_id) == {location_id(d.key_id) for d in (*PLACES, IMPORTED)}
        a = by_id[location_id(A.key_id)]
        assert (a.name, a.locality, a.is_monitor, a.is_mobile) == (A.key_id, "north", False, False)
        assert (a.coordinates.latitude, a.coordinates.longitude) == (52.52, 13.405)
        assert sorted((s.id, s.parameter.name, s.parameter.id) for s in a.sensors) == sorted(
            [(ids(A)[1], "pm25", 2), (ids(A, "no2")[1], "no2", 5)]
        )
        assert a.datetime_last.utc == "2026-01-11T23:50:00Z"  # the newest reading
        # The rate-limit headers the SDK reads, on a real response.
        assert everything.headers.x_ratelimit_limit == 500
        assert 0 < everything.headers.x_ratelimit_remaining <= 500

        near = client.locations.list(coordinates=(52.5205, 13.4060), radius=2000)
        assert [loc.id for loc in near.results] == [location_id(A.key_id), location_id(B.key_id)]
        assert near.results[0].distance is not None and near.results[0].distance < 100
        assert 1000 < near.results[1].distance < 2000  # type: ignore[operator]

        box = client.locations.list(bbox=(13.1, 52.3, 13.3, 52.45))
        assert [loc.id for loc in box.results] == [location_id(C.key_id)]

        first = client.locations.list(limit=2, page=1)
        second = client.locations.list(limit=2, page=2)
        assert first.meta.found == second.meta.found == 4
        assert len(first.results) == len(second.results) == 2
        assert {loc.id for loc in first.results + second.results} == set(by_id)


def test_sdk_reads_a_sensors_week_page_by_page(server: Server) -> None:
    lid, sid = ids(B)
    assert sid // METRIC_SLOTS == lid
    seen: list[tuple[str, float]] = []
    found: list[int | str] = []
    with server.sdk() as client:
        page = 1
        while True:
            response = client.measurements.list(
                sid,
                "measurements",
                datetime_from=iso(T0),
                datetime_to=iso(T0 + WEEK),
                limit=400,
                page=page,
            )
            found.append(response.meta.found)
            if not response.results:
                break
            seen += [(m.period.datetime_from.utc, m.value) for m in response.results]
            page += 1
    assert page == 4  # 400 + 400 + 208, then an empty page
    # As on OpenAQ: ">N" while rows follow that were not counted, then the exact count.
    assert found == [">400", ">800", PER_WEEK, PER_WEEK]
    expected = [
        (iso(T0 + k * TEN_MIN).strftime("%Y-%m-%dT%H:%M:%SZ"), pm25(B, k)) for k in range(PER_WEEK)
    ]
    assert seen == expected
    # ... and equal to what the store itself returns for the same device and metric.
    stored = server.store.readings(B.key_id, T0, T0 + WEEK, "pm25")
    assert [v for _, v in seen] == [r.value for r in stored]


def test_sdk_hourly_and_daily_equal_the_native_api(server: Server) -> None:
    _, sid = ids(A)
    with server.sdk() as client, server.http() as http:
        hourly = client.measurements.list(
            sid,
            "measurements",
            rollup="hourly",
            datetime_from=iso(T0),
            datetime_to=iso(T0 + WEEK),
            limit=1000,
        )
        native = http.get(
            "/api/v1/series",
            params={
                "metric": "pm25",
                "device": A.key_id,
                "start": iso(T0).isoformat(),
                "end": iso(T0 + WEEK).isoformat(),
                "resolution": "1h",
            },
        ).json()
        assert hourly.meta.found == len(native["points"]) == 7 * 24
        for ours, theirs in zip(hourly.results, native["points"], strict=True):
            assert ours.period.datetime_from.utc == theirs["start"]
            assert ours.period.label == "1hour"
            assert (ours.value, ours.summary.min, ours.summary.max) == (
                theirs["mean"],
                theirs["min"],
                theirs["max"],
            )
            assert ours.coverage.observed_count == theirs["count"] == 6
            assert ours.coverage.expected_count == 6  # 10-minute windows
        # /hours is the same rollup under the SDK's other name.
        hours = client.measurements.list(
            sid, "hours", datetime_from=iso(T0), datetime_to=iso(T0 + DAY), limit=1000
        )
        assert [m.value for m in hours.results] == [m.value for m in hourly.results[:24]]

        days = client.measurements.list(
            sid, "days", date_from=date(2026, 1, 5), date_to=date(2026, 1, 11)
        )
        native_days = http.get(
            "/api/v1/series",
            params={
                "metric": "pm25",
                "device": A.key_id,
                "start": iso(T0).isoformat(),
                "end": iso(T0 + WEEK).isoformat(),
                "resolution": "1d",
            },
        ).json()["points"]
        assert [(m.value, m.coverage.observed_count) for m in days.results] == [
            (p["mean"], p["count"]) for p in native_days
        ]
        assert len(days.results) == 7 and days.results[0].coverage.expected_count == 144
        for data, rollup in (("measurements", "daily"), ("hours", "daily")):
            daily = client.measurements.list(
                sid, data, rollup=rollup, datetime_from=iso(T0), datetime_to=iso(T0 + WEEK)
            )
            assert [m.value for m in daily.results] == [p["mean"] for p in native_days]
            assert daily.results[0].period.label == "1day"
        pm = client.parameters.get(2).results[0]
        assert (pm.name, pm.units, pm.display_name) == ("pm25", "µg/m³", "PM2.5")


def test_sdk_sensor_location_and_latest(server: Server) -> None:
    lid, sid = ids(C)
    with server.sdk() as client:
        sensor = client.sensors.get(sid).results[0]
        assert (sensor.id, sensor.name, sensor.parameter.units) == (sid, "pm25 µg/m³", "µg/m³")
        assert sensor.latest is not None
        assert sensor.latest.value == pm25(C, PER_WEEK - 1)
        location = client.locations.get(lid).results[0]
        assert (location.id, location.name) == (lid, C.key_id)
        sensors = client.locations.sensors(lid)
        assert {s.id for s in sensors.results} == {sid, sensor_id(lid, "no2")}
        latest = client.locations.latest(lid)
        assert {(x.sensors_id, x.locations_id, x.value) for x in latest.results} == {
            (sid, lid, pm25(C, PER_WEEK - 1)),
            (sensor_id(lid, "no2"), lid, 30.0 + (PER_WEEK - 1) % 11),
        }
        with pytest.raises(NotFoundError):
            client.sensors.get(sensor_id(lid, "o3"))  # C has no ozone sensor
        with pytest.raises(NotFoundError):
            client.locations.get(12345)
    with server.sdk() as client:
        client.headers["authorization"] = "Bearer cm_wrong"
        with pytest.raises(NotAuthorizedError):
            client.locations.list()


def test_the_sdk_honours_the_rate_limit_headers(server: Server) -> None:
    """With a 3-request bucket the SDK stops by itself (``auto_wait=False`` raises its
    own RateLimitError without asking the server): it read our headers."""
    tight = ApiSecurity(TokenFile(server.app.state.api_security.tokens.path), RateLimiter(0.01, 3))
    saved = server.app.state.api_security
    server.app.state.api_security = tight
    try:
        with server.sdk(auto_wait=False) as client:
            remaining = [client.parameters.list().headers.x_ratelimit_remaining for _ in range(3)]
            assert remaining == [2, 1, 0]
            with pytest.raises(RateLimitError):
                client.parameters.list()
    finally:
        server.app.state.api_security = saved


# ------------------------------------------------------------------ raw HTTP details


def test_imported_values_say_so(server: Server) -> None:
    lid, sid = ids(IMPORTED)
    with server.http() as http:
        body = http.get(
            f"/openaq/v3/sensors/{sid}/measurements",
            params={"datetime_from": iso(T0).isoformat(), "datetime_to": iso(T0 + DAY).isoformat()},
        ).json()
        assert [m["value"] for m in body["results"]] == [7.0 + k for k in range(6)]
        assert {m["provenance"]["source"] for m in body["results"]} == {"imported"}
        latest = http.get(f"/openaq/v3/locations/{lid}/latest").json()["results"]
        assert [(x["value"], x["provenance"]["source"]) for x in latest] == [(12.0, "imported")]


def test_flags_provenance_and_headers_in_the_raw_json(server: Server) -> None:
    _, sid = ids(A)
    with server.http() as http:
        response = http.get(
            f"/openaq/v3/sensors/{sid}/measurements",
            params={
                "datetime_from": iso(T0).isoformat(),
                "datetime_to": iso(T0 + HOUR).isoformat(),
            },
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"meta", "results"}
        assert body["meta"] | {"found": None} == {
            "name": "civicmesh-openaq",
            "website": "/openaq/v3",
            "page": 1,
            "limit": 100,
            "found": None,
        }
        first = body["results"][0]  # k = 0: flagged stuck + simulated
        assert first["flagInfo"] == {
            "hasFlags": True,
            "flags": ["stuck", "simulated"],
            "quality": 132,
        }
        assert first["anomalyScore"] is None  # no anomaly model ran on these
        assert first["provenance"] == {"source": "device-signed", "deviceId": A.key_id}
        assert body["results"][1]["flagInfo"]["hasFlags"] is False
        assert first["period"]["interval"] == "00:10:00"
        for name in ("limit", "remaining", "used", "reset"):
            assert response.headers[f"x-ratelimit-{name}"].isdigit()

        # Errors carry the headers too, and say what is wrong.
        bad = http.get("/openaq/v3/locations", params={"bbox": "13,52,x,53"})
        assert bad.status_code == 422
        assert "bbox must be min_lon,min_lat,max_lon,max_lat" in bad.json()["detail"]
        assert "x-ratelimit-remaining" in bad.headers
        alone = http.get("/openaq/v3/locations", params={"coordinates": "52.5,13.4"})
        assert alone.status_code == 422 and "radius" in alone.json()["detail"]
        both = http.get(
            "/openaq/v3/locations",
            params={"coordinates": "52.5,13.4", "radius": 10, "bbox": "1,2,3,4"},
        )
        assert both.status_code == 422 and "not both" in both.json()["detail"]
        long = http.get(
            f"/openaq/v3/sensors/{sid}/measurements",
            params={"datetime_from": "2025-01-01", "datetime_to": "2026-01-01"},
        )
        assert long.status_code == 422 and "31 days" in long.json()["detail"]
        unauth = httpx.get(
            f"{server.url}/openaq/v3/parameters",
            verify=ssl.create_default_context(cafile=server.ca),
        )
        assert unauth.status_code == 401 and "x-ratelimit-limit" in unauth.headers
        params = http.get("/openaq/v3/parameters").json()
        assert {p["name"]: p["id"] for p in params["results"]}["pm25"] == parameter_id("pm25") == 2


# ------------------------------------------------------------------ export


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_export_csv_from_the_api(server: Server) -> None:
    span = {"start": iso(T0).isoformat(), "end": iso(T0 + WEEK).isoformat()}
    with server.http() as http:
        with http.stream("GET", "/api/v1/export.csv", params={**span, "device": A.key_id}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/csv")
            assert "content-length" not in r.headers  # streamed (chunked)
            assert "attachment" in r.headers["content-disposition"]
            chunks = list(r.iter_text())
        rows = read_csv("".join(chunks))
        assert len(rows) == 2 * PER_WEEK
        pm = [row for row in rows if row["metric"] == "pm25"]
        assert [float(row["value"]) for row in pm] == [pm25(A, k) for k in range(PER_WEEK)]
        assert pm[0]["flags"] == "stuck|simulated" and pm[0]["quality"] == "132"
        assert {row["provenance"] for row in rows} == {"device-signed"}
        assert {row["device_id"] for row in rows} == {A.key_id}

        zone = read_csv(
            http.get("/api/v1/export.csv", params={**span, "zone": "north", "metric": "no2"}).text
        )
        assert len(zone) == 2 * PER_WEEK and {r["metric"] for r in zone} == {"no2"}
        city = read_csv(http.get("/api/v1/export.csv", params={**span, "resolution": "1h"}).text)
        assert len(city) == 3 * 2 * 7 * 24 + 1  # and the imported station's one hour
        assert {r["count"] for r in city} == {"6"}
        imported = [r for r in city if r["device_id"] == IMPORTED.key_id]
        assert [(r["provenance"], r["mean"]) for r in imported] == [("imported", "9.5")]
        assert {r["provenance"] for r in city} == {"device-signed", "imported"}

        unknown = http.get("/api/v1/export.csv", params={**span, "device": "nope"})
        assert unknown.status_code == 404 and "Unknown device 'nope'" in unknown.json()["detail"]
        metric = http.get("/api/v1/export.csv", params={**span, "metric": "pm2.5"})
        assert metric.status_code == 422 and "known metrics" in metric.json()["detail"]
        both = http.get("/api/v1/export.csv", params={**span, "zone": "north", "device": A.key_id})
        assert both.status_code == 422


def test_export_streams_in_slices(store: Store) -> None:
    """The city's week comes out as one chunk per day and device, never all at once."""
    request = ExportRequest(T0, T0 + WEEK, Resolution.RAW)
    chunks = csv_chunks(store, request)
    header = next(chunks)
    assert header.startswith("time_utc,ts_ms,device_id")
    rows = [chunk.count("\n") for chunk in chunks]
    # A, B, C: a day of two metrics each, every day; the imported station: its one hour.
    assert sorted(rows) == [6] + [2 * 144] * (7 * 3)
    assert sum(rows) == 3 * 2 * PER_WEEK + 6


def test_civicmesh_export_command(
    filled: tuple[Store, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, url = filled
    out = tmp_path / "c.csv"
    code = civicmesh_main(
        [
            "export",
            "--database-url",
            url,
            "--device",
            C.key_id,
            "--start",
            "2026-01-05",
            "--end",
            "2026-01-06",
            "--resolution",
            "1h",
            "--metric",
            "pm25",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = read_csv(out.read_text(encoding="utf-8"))
    assert len(rows) == 24 and {r["resolution"] for r in rows} == {"1h"}
    native = store.rollup_series("pm25", T0, T0 + DAY, Resolution.HOUR, device_id=C.key_id)
    assert [float(r["mean"]) for r in rows] == [p.mean for p in native]
    assert "exported 24 rows" in capsys.readouterr().err
    assert not (tmp_path / "c.csv.part").exists()

    bad = civicmesh_main(
        ["export", "--database-url", url, "--start", "yesterday", "--end", "2026-01-06"]
    )
    assert bad != 0
    assert "not an ISO 8601 date" in capsys.readouterr().err
    zone = civicmesh_main(
        [
            "export",
            "--database-url",
            url,
            "--zone",
            "atlantis",
            "--start",
            "2026-01-05",
            "--end",
            "2026-01-06",
        ]
    )
    assert zone != 0
    assert "Unknown zone 'atlantis'; known zones: north, south" in capsys.readouterr().err


def test_openaq_routes_are_in_the_openapi_document(server: Server) -> None:
    app = server.app
    with TestClient(app) as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/openaq/v3/locations",
        "/openaq/v3/locations/{locations_id}/latest",
        "/openaq/v3/sensors/{sensors_id}/measurements/hourly",
        "/api/v1/export.csv",
    ):
        assert path in paths


def test_export_quotes_a_zone_with_a_comma(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'quoted.db'}")
    try:
        store.migrate()
        device = signer("quoted")
        zone = 'ring road, "east"'
        store.upsert_devices(
            [DeviceRecord(device.key_id, device.verify_key().to_text(), zone, None, None)]
        )
        readings = [Reading(T0 + k * TEN_MIN, "no2", 40.0 + k / 3) for k in range(3)]
        store.write_batches([sealed(device, 1, GENESIS_HASH, readings)])
        text = "".join(csv_chunks(store, ExportRequest(T0, T0 + HOUR, zone=zone)))
    finally:
        store.close()
    rows = read_csv(text)
    assert [(r["zone"], r["lat"], r["value"]) for r in rows] == [
        (zone, "", repr(40.0 + k / 3)) for k in range(3)
    ]
    assert [float(r["value"]) for r in rows] == [r.value for r in readings]  # exact round trip
