"""SensorThings API 1.1 (read) under /sta/v1.1: driven by the ``frost-sta-client``
package from PyPI and by the requests QGIS makes, against a real uvicorn server on
127.0.0.1 over a store filled with a simulated week of really sealed batches through the
store's write path (SQLite, and PostgreSQL in the integration run)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import frost_sta_client as fsc
import httpx
import pytest
import requests
from frost_sta_client.service.auth_handler import AuthHandler
from support import (
    admin_url,
    create_database,
    drop_database,
    quiet_policy,
    relayed_batch,
    serve_app,
)

from analytics.api import create_app
from analytics.api.openaq import Network, location_id, parameter_id, sensor_id
from analytics.api.sta.evaluate import time_bounds
from analytics.api.sta.model import Graph
from analytics.api.sta.odata import (
    Options,
    QueryError,
    parse_expand,
    parse_filter,
    parse_orderby,
    to_text,
)
from analytics.api.sta.query import Observations
from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
from analytics.store import open_store
from analytics.store.base import Store, StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.protocol import GENESIS_HASH, Reading
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry

# frost-sta-client calls furl's deprecated ``pathstr`` on every request: third-party, not
# ours to fix (as pyproject does for amqtt's).
pytestmark = pytest.mark.filterwarnings("ignore:furl.pathstr is deprecated:DeprecationWarning")

T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z
TEN_MIN = 600_000
DAY = 86_400_000
WEEK = 7 * DAY
PER_WEEK = WEEK // TEN_MIN  # 1008 readings per device and metric


def signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"test_sensorthings/{name}".encode()).digest())


GATEWAY = signer("gateway")
A, B, C = signer("a"), signer("b"), signer("c")
IMPORTED = signer("imported")  # a station `civicmesh import` brought in (kind "import")
PLACES = {  # (zone, lat, lon, kind)
    A: ("north", 52.5200, 13.4050, "air"),
    B: ("north", 52.5300, 13.4200, "multi"),
    C: ("south", 52.40, 13.20, "air"),
}
OFFSET = {A: 0.0, B: 100.0, C: 200.0}


def pm25(device: Ed25519Signer, k: int) -> float:
    return OFFSET[device] + 10.0 + (k % 37) * 0.5


def quality(k: int) -> int:
    return int(Quality.STUCK | Quality.SIMULATED) if k % 97 == 0 else 0


def sealed(device: Ed25519Signer, seq: int, prev: bytes, readings: list[Reading]) -> StoredBatch:
    return relayed_batch(device, GATEWAY, seq, prev, readings)


def fill(store: Store) -> None:
    """A week of pm25 and no2 every 10 min for A, B, C (a batch every 6 hours each), and
    six archived pm25 values of an imported station."""
    registry = Registry.empty().with_gateway(
        GatewayRecord(GATEWAY.key_id, GATEWAY.verify_key().to_text())
    )
    for device, (zone, lat, lon, kind) in PLACES.items():
        registry = registry.with_device(
            DeviceRecord(device.key_id, device.verify_key().to_text(), zone, lat, lon, kind=kind)
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
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("sta")
    url = f"sqlite:///{tmp / 'sta.db'}" if request.param == "sqlite" else create_database()
    opened = open_store(url, timescaledb="off", policy=quiet_policy())
    try:
        opened.migrate()
        fill(opened)
        yield opened
    finally:
        opened.close()
        if request.param != "sqlite":
            drop_database(url, admin_url())


@dataclass
class Server:
    url: str  # http://127.0.0.1:port
    token: str
    store: Store

    @property
    def sta(self) -> str:
        return f"{self.url}/sta/v1.1"

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.sta, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def frost(self) -> fsc.SensorThingsService:
        return fsc.SensorThingsService(self.sta, auth_handler=BearerAuth(self.token))


class BearerAuth(AuthHandler):
    """frost-sta-client's auth hook (it accepts AuthHandler instances) sending a civicmesh
    bearer token instead of HTTP basic auth."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def add_auth_header(self) -> Any:
        token = self.token

        def bearer(r: requests.PreparedRequest) -> requests.PreparedRequest:
            r.headers["Authorization"] = f"Bearer {token}"
            return r

        return bearer


@pytest.fixture(scope="module")
def server(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tokens = TokenFile(tmp_path_factory.mktemp("sta-server") / "tokens.json")
    token = tokens.add("qgis", "viewer")
    app = create_app(
        store, window_s=600, security=ApiSecurity(tokens, RateLimiter(rate=500.0, burst=2000))
    )
    with serve_app(app) as url:
        yield Server(url, token, store)


def thing_id(device: Ed25519Signer) -> int:
    return location_id(device.key_id)


def datastream_id(device: Ed25519Signer, metric: str = "pm25") -> int:
    return sensor_id(location_id(device.key_id), metric)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# ------------------------------------------------------------------ frost-sta-client


def test_frost_client_lists_things_and_reads_a_datastream(server: Server) -> None:
    service = server.frost()
    things = service.things().query().count().list()
    names = sorted(t.name for t in things)
    assert names == sorted(d.key_id for d in (A, B, C, IMPORTED))
    assert things.count == 4
    thing = service.things().find(thing_id(A))
    assert thing.name == A.key_id
    assert thing.properties["provenance"] == "device-signed"
    datastream = service.datastreams().find(datastream_id(A))
    assert datastream.unit_of_measurement.symbol == "µg/m³"
    assert datastream.name == f"pm25 at {A.key_id}"
    streams = sorted(
        d.id for d in service.datastreams().query().filter(f"Thing/id eq {thing_id(A)}").list()
    )
    assert streams == sorted([datastream_id(A), datastream_id(A, "no2")])


def test_frost_client_pages_through_a_datastreams_week(server: Server) -> None:
    service = server.frost()
    datastream = service.datastreams().find(datastream_id(B))
    week = (
        datastream.get_observations()
        .query()
        .filter(f"phenomenonTime ge {iso(T0)} and phenomenonTime lt {iso(T0 + WEEK)}")
        .orderby("phenomenonTime", "asc")
        .top(250)
        .count()
        .list()
    )
    assert week.count == PER_WEEK
    assert len(week.entities) == 250 and week.next_link is not None
    seen = list(week)  # iterating follows @iot.nextLink verbatim, page after page
    assert len(seen) == PER_WEEK
    expected = [(iso(T0 + k * TEN_MIN), pm25(B, k)) for k in range(PER_WEEK)]
    assert [(o.phenomenon_time, o.result) for o in seen] == expected
    flagged = [o for o in seen if o.result_quality["quality"]]
    assert len(flagged) == len([k for k in range(PER_WEEK) if quality(k)])
    assert flagged[0].result_quality["flags"] == ["stuck", "simulated"]
    assert {o.result_quality["provenance"] for o in seen} == {"device-signed"}
    # each value equals the store's own reading of the same device, metric and time
    stored = server.store.readings(B.key_id, T0, T0 + WEEK, "pm25")
    assert [r.value for r in stored] == [o.result for o in seen]


def test_frost_client_one_day_descending(server: Server) -> None:
    service = server.frost()
    day = (
        service.datastreams()
        .find(datastream_id(C, "no2"))
        .get_observations()
        .query()
        .filter(f"phenomenonTime ge {iso(T0 + DAY)} and phenomenonTime lt {iso(T0 + 2 * DAY)}")
        .orderby("phenomenonTime", "desc")
        .top(1000)
        .list()
    )
    values = [(o.phenomenon_time, o.result) for o in day]
    ks = range(2 * 144 - 1, 144 - 1, -1)
    assert values == [(iso(T0 + k * TEN_MIN), 30.0 + k % 11) for k in ks]


# ------------------------------------------------------------------ what QGIS sends


def test_service_root_and_conformance(server: Server) -> None:
    with server.http() as http:
        root = http.get("").json()
    names = [e["name"] for e in root["value"]]
    assert names == [
        "Things",
        "Locations",
        "HistoricalLocations",
        "Sensors",
        "ObservedProperties",
        "Datastreams",
        "Observations",
        "FeaturesOfInterest",
    ]
    assert root["value"][0]["url"] == f"{server.sta}/Things"
    conformance = root["serverSettings"]["conformance"]
    assert "http://www.opengis.net/spec/iot_sensing/1.1/req/request-data" in conformance


def test_qgis_count_probe_and_point_filter(server: Server) -> None:
    with server.http() as http:
        probe = http.get("Locations", params={"$top": "0", "$count": "true"}).json()
        assert probe == {"@iot.count": 4, "value": []}
        points = http.get(
            "Locations",
            params={"$filter": "location/type eq 'Point'", "$count": "true", "$top": "2"},
        ).json()
        assert points["@iot.count"] == 4 and len(points["value"]) == 2
        rest = http.get(points["@iot.nextLink"]).json()  # verbatim
        assert len(rest["value"]) == 2 and "@iot.nextLink" not in rest
        ids = [v["@iot.id"] for v in points["value"] + rest["value"]]
        assert sorted(ids) == sorted(thing_id(d) for d in (A, B, C, IMPORTED))
        assert points["value"][0]["location"]["type"] == "Point"
        none = http.get("Locations", params={"$filter": "location/type eq 'Polygon'"}).json()
        assert none["value"] == []


def test_geo_intersects_and_distance(server: Server) -> None:
    # Berlin's centre: A and B inside, C (19 km south-west) and the imported station not.
    polygon = "POLYGON((13.35 52.50, 13.45 52.50, 13.45 52.55, 13.35 52.55, 13.35 52.50))"
    with server.http() as http:
        found = http.get(
            "Locations",
            params={"$filter": f"geo.intersects(location, geography'{polygon}')"},
        ).json()
        assert sorted(v["name"] for v in found["value"]) == sorted([A.key_id, B.key_id])
        things = http.get(
            "Things",
            params={
                "$filter": f"geo.intersects(Locations/location, geography'{polygon}')",
            },
        )
        assert things.status_code == 400  # a collection in $filter needs any(): refused
        near = http.get(
            "Locations",
            params={
                "$filter": "geo.distance(location, geography'POINT(13.405 52.52)') lt 0.02",
                "$orderby": "name",
            },
        ).json()
        assert sorted(v["name"] for v in near["value"]) == sorted([A.key_id, B.key_id])
        # as QGIS writes it: WKT in mixed case with a space, optionally with an SRID
        qgis = polygon.replace("POLYGON((", "Polygon ((")
        for literal in (qgis, f"SRID=4326;{qgis}"):
            same = http.get(
                "Locations",
                params={"$filter": f"geo.intersects(location, geography'{literal}')"},
            ).json()
            assert sorted(v["name"] for v in same["value"]) == sorted([A.key_id, B.key_id])
        hull = http.get(
            "Locations",
            params={"$filter": f"not geo.intersects(location, geography'{polygon}')"},
        ).json()
        assert len(hull["value"]) == 2


def test_expand_with_nested_options(server: Server) -> None:
    with server.http() as http:
        thing = http.get(
            f"Things({thing_id(A)})",
            params={
                "$expand": "Locations,Datastreams($orderby=name;$expand=Observations("
                "$top=2;$orderby=phenomenonTime desc;$select=result,phenomenonTime))",
                "$select": "name,id",
            },
        ).json()
    assert set(thing) == {"@iot.id", "name", "Locations", "Datastreams"}
    assert thing["Locations"][0]["location"]["coordinates"] == [13.4050, 52.5200]
    streams = thing["Datastreams"]
    assert [d["name"] for d in streams] == [f"no2 at {A.key_id}", f"pm25 at {A.key_id}"]
    last = PER_WEEK - 1
    assert streams[1]["Observations"] == [
        {"result": pm25(A, last), "phenomenonTime": iso(T0 + last * TEN_MIN)},
        {"result": pm25(A, last - 1), "phenomenonTime": iso(T0 + (last - 1) * TEN_MIN)},
    ]
    link = streams[1]["Observations@iot.nextLink"]
    assert link.startswith(f"{server.sta}/Datastreams({datastream_id(A)})/Observations?")
    with server.http() as http:
        following = http.get(link).json()  # the same order and select, the next two
    assert following["value"] == [
        {"result": pm25(A, k), "phenomenonTime": iso(T0 + k * TEN_MIN)}
        for k in (last - 2, last - 3)
    ]


def test_navigation_links_and_paths(server: Server) -> None:
    with server.http() as http:
        thing = http.get(f"Things({thing_id(C)})").json()
        assert thing["@iot.selfLink"] == f"{server.sta}/Things({thing_id(C)})"
        streams = http.get(thing["Datastreams@iot.navigationLink"]).json()["value"]
        assert {s["@iot.id"] for s in streams} == {datastream_id(C), datastream_id(C, "no2")}
        pm = next(s for s in streams if s["@iot.id"] == datastream_id(C))
        assert pm["observedArea"] == {"type": "Point", "coordinates": [13.20, 52.40]}
        prop = http.get(pm["ObservedProperty@iot.navigationLink"]).json()
        assert prop["@iot.id"] == parameter_id("pm25") and prop["name"] == "pm25"
        sensor = http.get(pm["Sensor@iot.navigationLink"]).json()
        assert sensor["properties"]["kind"] == "air"
        first = http.get(
            pm["Observations@iot.navigationLink"],
            params={"$top": "1", "$orderby": "phenomenonTime"},
        ).json()["value"][0]
        assert first["result"] == pm25(C, 0)
        again = http.get(first["@iot.selfLink"]).json()
        assert again["result"] == pm25(C, 0) and again["@iot.id"] == first["@iot.id"]
        feature = http.get(first["FeatureOfInterest@iot.navigationLink"]).json()
        assert feature["feature"]["coordinates"] == [13.20, 52.40]
        back = http.get(first["Datastream@iot.navigationLink"] + "/Thing/name").json()
        assert back == {"name": C.key_id}
        raw = http.get(f"Things({thing_id(C)})/name/$value")
        assert raw.text == C.key_id
        history = http.get(f"Things({thing_id(C)})/HistoricalLocations").json()["value"]
        assert len(history) == 1 and history[0]["time"] == iso(T0 + (PER_WEEK - 1) * TEN_MIN)


def test_filters_on_results_flags_and_text(server: Server) -> None:
    start, end = iso(T0), iso(T0 + DAY)
    with server.http() as http:
        high = http.get(
            f"Datastreams({datastream_id(A)})/Observations",
            params={
                "$filter": f"phenomenonTime ge {start} and phenomenonTime lt {end} "
                "and (result ge 27.5 or result eq 10.0)",
                "$count": "true",
                "$top": "1000",
            },
        ).json()
        expected = [k for k in range(144) if pm25(A, k) >= 27.5 or pm25(A, k) == 10.0]
        assert high["@iot.count"] == len(expected)
        assert [v["result"] for v in high["value"]] == [pm25(A, k) for k in expected]
        flagged = http.get(
            "Observations",
            params={"$filter": "resultQuality/quality ne 0", "$count": "true", "$top": "5"},
        ).json()
        assert flagged["@iot.count"] == 3 * len([k for k in range(PER_WEEK) if quality(k)])
        imported = http.get(
            "Things",
            params={"$filter": "properties/provenance eq 'imported'"},
        ).json()["value"]
        assert [t["name"] for t in imported] == [IMPORTED.key_id]
        prefix = A.key_id[:6]
        by_name = http.get("Things", params={"$filter": f"substringof('{prefix}', name)"}).json()[
            "value"
        ]
        assert A.key_id in {t["name"] for t in by_name}
        hours = http.get(
            f"Datastreams({datastream_id(A)})/Observations",
            params={
                "$filter": f"phenomenonTime lt {end} and hour(phenomenonTime) eq 3 "
                "and minute(phenomenonTime) eq 0",
            },
        ).json()["value"]
        assert [v["phenomenonTime"] for v in hours] == [iso(T0 + 3 * 3_600_000)]
        units = http.get(
            "Datastreams",
            params={"$filter": "unitOfMeasurement/symbol eq 'µg/m³'", "$count": "true"},
        ).json()
        assert units["@iot.count"] == 7  # no2 and pm25 of A, B, C, and the import's pm25
        assert units["@iot.count"] == len(units["value"])


def test_imported_observations_say_so(server: Server) -> None:
    with server.http() as http:
        values = http.get(f"Datastreams({datastream_id(IMPORTED)})/Observations").json()["value"]
    assert [v["result"] for v in values] == [7.0 + k for k in range(6)]
    assert {v["resultQuality"]["provenance"] for v in values} == {"imported"}


def test_bad_queries_get_400_with_a_reason(server: Server) -> None:
    cases = {
        "Things?$filter=name eq": "Cannot parse $filter",
        "Things?$filter=frobnicate(name)": "Unknown function 'frobnicate'",
        "Things?$filter=colour eq 'red'": "Things have no property 'colour'",
        "Things?$top=abc": "$top must be a whole number",
        "Things?$top=100000": "$top is at most",
        "Things?$orderby=name sideways": "Cannot parse $orderby",
        "Things?$expand=Datastreams($top=x)": "Cannot parse $expand",
        "Things?$expand=Owner": "$expand: Things have no 'Owner'",
        "Things?$select=colour": "$select: Things have no 'colour'",
        "Things?$resultFormat=dataArray": "Unsupported query option $resultFormat",
        "Things?$count=maybe": "$count must be true or false",
        "Locations?$filter=geo.intersects(location, geography'POLYGON((1 2, 3 4))')": "not closed",
        "Locations?$filter=geo.intersects(location, geography'CIRCLE(1 2)')": "geography literal",
        "Things?$filter=name gt 3": "Cannot compare str with int",
        "Things(abc)": "Bad id",
    }
    with server.http() as http:
        for query, reason in cases.items():
            response = http.get(query)
            assert response.status_code == 400, (query, response.text)
            body = response.json()
            assert body["code"] == 400 and reason in body["message"], (query, body)
        assert http.get("Widgets").status_code == 404
        missing = http.get("Things(12345)")
        assert missing.status_code == 404 and "Nothing found" in missing.json()["message"]
        assert http.get("Observations('1-2')").status_code == 404
    anonymous = httpx.get(f"{server.sta}/Things", timeout=10)
    assert anonymous.status_code == 401


def test_time_filters_reach_the_store(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A week's page reads that week a day at a time, not the datastream's history."""
    calls: list[tuple[int, int]] = []
    real = type(server.store).readings

    def spy(self: Store, device_id: str, start_ms: int, end_ms: int, metric: str | None = None):  # type: ignore[no-untyped-def]
        calls.append((start_ms, end_ms))
        return real(self, device_id, start_ms, end_ms, metric)

    monkeypatch.setattr(type(server.store), "readings", spy)
    with server.http() as http:
        page = http.get(
            f"Datastreams({datastream_id(A)})/Observations",
            params={
                "$filter": f"phenomenonTime ge {iso(T0 + 2 * DAY)} and "
                f"phenomenonTime lt {iso(T0 + 3 * DAY)}",
                "$top": "10",
            },
        ).json()
    assert len(page["value"]) == 10
    assert calls == [(T0 + 2 * DAY, T0 + 3 * DAY)]  # one query, just that day


def test_a_query_that_would_read_too_much_is_refused(store: Store) -> None:
    graph = Graph(Network.read(store))
    streams = list(graph.sets["Datastreams"].values())
    everything = Observations(store, graph, streams, max_reads=20)
    with pytest.raises(QueryError, match="more than 20 datastream-days"):
        everything.page(Options(orderby=parse_orderby("result desc")))
    # ordered by time, a first page reads one day of each datastream and stops
    first = Observations(store, graph, streams, max_reads=20).page(Options(top=3))
    assert len(first.items) == 3 and first.more


def test_odata_grammar_directly() -> None:
    tree = parse_filter("not (result gt 3 and phenomenonTime le 2026-01-05T00:00:00+01:00)")
    assert "Not" in type(tree).__name__
    items = parse_expand("Datastreams/Observations($top=1),Thing($select=name)")
    assert [i.path for i in items] == [("Datastreams", "Observations"), ("Thing",)]
    assert items[0].options.top == 1 and items[1].options.select == ["name"]
    with pytest.raises(QueryError, match="column"):
        parse_filter("result gt gt 3")


@pytest.mark.parametrize(
    "text",
    [
        "not (result gt -3.5 and phenomenonTime le 2026-01-05T00:00:00.000500+01:00)",
        "substringof('it''s', name) or location/type eq 'Point' and id ne null",
        "geo.intersects(location, geography'POLYGON((13.35 52.5, 13.45 52.5, 13.4 52.6, "
        "13.35 52.5))') and geo.distance(location, geography'POINT(1 2)') lt 1e-3",
        "year(phenomenonTime) add 1 mul 2 eq 4053 and true",
    ],
)
def test_filters_write_back_as_text_that_parses_the_same(text: str) -> None:
    tree = parse_filter(text)
    assert parse_filter(to_text(tree)) == tree


def test_time_bounds_are_exact_to_the_millisecond() -> None:
    t = "2026-01-05T00:00:00Z"
    exact = time_bounds(parse_filter(f"phenomenonTime gt {t} and {t} ge resultTime"))
    assert (exact.start, exact.end, exact.residual) == (T0 + 1, T0 + 1, None)
    day = time_bounds(parse_filter(f"phenomenonTime eq {t} and result gt 3"))
    assert (day.start, day.end) == (T0, T0 + 1)
    assert day.residual == parse_filter("result gt 3")
    fine = time_bounds(parse_filter("phenomenonTime lt 2026-01-05T00:00:00.0005Z"))
    assert (fine.start, fine.end) == (None, T0 + 1)  # widened; the term stays a filter
    assert fine.residual is not None
    either = time_bounds(parse_filter(f"phenomenonTime gt {t} or result gt 3"))
    assert (either.start, either.end) == (None, None)  # an `or` narrows nothing


def test_strict_time_comparisons_over_http(server: Server) -> None:
    at = iso(T0 + 6 * TEN_MIN)
    with server.http() as http:
        after = http.get(
            f"Datastreams({datastream_id(A)})/Observations",
            params={"$filter": f"phenomenonTime gt {at}", "$top": "1"},
        ).json()["value"]
        until = http.get(
            f"Datastreams({datastream_id(A)})/Observations",
            params={"$filter": f"phenomenonTime le {at}", "$orderby": "phenomenonTime desc"},
        ).json()["value"]
    assert [v["phenomenonTime"] for v in after] == [iso(T0 + 7 * TEN_MIN)]
    assert [v["phenomenonTime"] for v in until] == [iso(T0 + k * TEN_MIN) for k in range(6, -1, -1)]
