"""The dashboard: sign-in and roles, its data, live readings, admin pages, and a real
headless Chromium (Debian's, driven by Playwright) going through every page.

The server is the real app (uvicorn on a free loopback port) over a SQLite store holding
eight days of the simulated city, written as signed, chained batches.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from support import free_port, wait_for_port

from analytics.alerts.config import AlertSettings
from analytics.alerts.engine import build_engine
from analytics.alerts.state import AlertLog
from analytics.api import create_app
from analytics.dashboard.auth import SessionSigner, UserFile, check_password, hash_password
from analytics.dashboard.routes import Dashboard, seed_zone_shapes
from analytics.dashboard.views import CHART_METRICS, trailing_means
from analytics.reports.facts import iso
from analytics.reports.service import ReportService, generate_due
from analytics.store import open_store
from analytics.store.base import Resolution, SeriesPoint, Store
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import Quality
from civicmesh.protocol import Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import Registry
from civicmesh.timeutil import now_ms
from demo.history import (
    device_records,
    fill_store,
    history_devices,
    history_signer,
    stored_batch,
)
from firmware_sim.city import SimulatedCity

DAY = 86_400_000
PASSWORD = "correct horse battery"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class Site:
    url: str
    store: Store
    city: SimulatedCity
    registry: Path
    alerts: Path


@pytest.fixture(scope="module")
def city() -> SimulatedCity:
    return SimulatedCity.generate(7, devices=8, zones=4)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, city: SimulatedCity) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dashboard")
    store = open_store(f"sqlite:///{tmp / 'city.db'}")
    store.migrate()
    end = now_ms()
    fill_store(store, city, end - 8 * DAY, end, step_ms=600_000)
    registry = tmp / "registry.json"
    reg = Registry.empty()
    for record in device_records(city, end - 9 * DAY):
        reg = reg.with_device(record)
    reg.save(registry)
    geojson = tmp / "zones.geojson"
    geojson.write_text(json.dumps(city.zones_geojson()))
    assert seed_zone_shapes(store, geojson) == 4
    users = UserFile(tmp / "users.json")
    for role in ("admin", "operator", "viewer"):
        users.add(role, role, PASSWORD)
    reports = ReportService(store, None, timezone="UTC", window_s=600)
    generate_due(reports)
    # the real alert engine, evaluated once over the city: PM2.5 above the WHO 24-h
    # guideline for an hour of the last day opens alerts the dashboard lists
    alerts = AlertSettings.model_validate(
        {
            "state_file": str(tmp / "alerts.db"),
            "rules": [
                {"id": "pm25-who", "kind": "who_exceedance", "metric": "pm25", "min_hours": 1}
            ],
        }
    )
    engine = build_engine(alerts)
    assert engine is not None
    engine.evaluate(store, end)
    engine.close()
    dashboard = Dashboard(
        store,
        reports,
        users,
        SessionSigner(None),
        registry_path=registry,
        window_s=600,
        live_interval_s=0.2,
    )
    app = create_app(
        store,
        window_s=600,
        reports=reports,
        dashboard=dashboard,
        alerts_state_file=alerts.state_file,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for_port(port, 20)
    yield Site(f"http://127.0.0.1:{port}", store, city, registry, alerts.state_file)
    server.should_exit = True
    thread.join(10)
    store.close()


@pytest.fixture
def clients() -> Iterator[list[httpx.Client]]:
    made: list[httpx.Client] = []
    yield made
    for client in made:
        client.close()


def signed_in(site: Site, role: str, clients: list[httpx.Client]) -> httpx.Client:
    client = httpx.Client(base_url=site.url, timeout=30)
    clients.append(client)
    response = client.post("/dashboard/auth/login", json={"username": role, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


def write_new_reading(site: Site, value: float = 42.0, quality: int = 0, index: int = 0) -> str:
    """One more signed batch from a device, as ingest would store it."""
    device = history_devices(site.city)[index]
    status = {d.device_id: d for d in site.store.devices()}[device.signer.key_id]
    last = site.store.ledger(device.signer.key_id, after_seq=(status.last_seq or 1) - 1, limit=1)
    seq = (status.last_seq or 0) + 1
    t = now_ms()
    payload = make_payload(
        device.signer.key_id,
        seq,
        last[0].payload_hash,
        t,
        [Reading(t - 1000, "no2", value, quality)],
        "sim-history",
    )
    batch = seal_batch(device.signer, payload)
    gateway = history_signer(site.city.seed, "gateway")
    envelope = wrap_envelope(gateway, batch.message, t + 10)
    site.store.write_batches([stored_batch(batch, envelope, last[0].payload_hash, gateway.key_id)])
    return device.signer.key_id


# ------------------------------------------------------------------ sign-in, roles


def test_passwords_are_scrypt_hashes_that_check() -> None:
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    assert check_password(PASSWORD, stored) and not check_password("wrong password", stored)
    assert not check_password(PASSWORD, "md5$abc")


def test_sign_in_roles_and_sessions(site: Site, clients: list[httpx.Client]) -> None:
    anonymous = httpx.Client(base_url=site.url, timeout=10)
    clients.append(anonymous)
    assert anonymous.get("/dashboard/api/overview").status_code == 401
    bad = anonymous.post("/dashboard/auth/login", json={"username": "admin", "password": "nope"})
    assert bad.status_code == 401
    forged = httpx.Client(base_url=site.url, cookies={"civicmesh_session": "e30.deadbeef"})
    clients.append(forged)
    assert forged.get("/dashboard/api/me").status_code == 401
    viewer = signed_in(site, "viewer", clients)
    assert viewer.get("/dashboard/api/me").json()["role"] == "viewer"
    assert viewer.post("/dashboard/api/reports", json={"kind": "daily"}).status_code == 403
    assert viewer.get("/dashboard/api/admin/zones").status_code == 403
    operator = signed_in(site, "operator", clients)
    made = operator.post("/dashboard/api/reports", json={"kind": "daily", "zone": "harbour"})
    assert made.status_code == 200 and made.json()["scope"] == "harbour"
    assert operator.get("/dashboard/api/admin/zones").status_code == 403
    admin = signed_in(site, "admin", clients)
    assert admin.get("/dashboard/api/admin/zones").status_code == 200


def test_sign_in_attempts_are_limited(tmp_path: Path, site: Site) -> None:
    users = UserFile(tmp_path / "users.json")
    users.add("someone", "viewer", PASSWORD)
    dashboard = Dashboard(site.store, ReportService(site.store, None), users, SessionSigner(None))
    client = TestClient(create_app(site.store, dashboard=dashboard))
    codes = [
        client.post(
            "/dashboard/auth/login", json={"username": "someone", "password": "x"}
        ).status_code
        for _ in range(12)
    ]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]


def test_only_failed_sign_ins_count_against_the_limit(tmp_path: Path, site: Site) -> None:
    users = UserFile(tmp_path / "users.json")
    users.add("clerk", "viewer", PASSWORD)
    dashboard = Dashboard(site.store, ReportService(site.store, None), users, SessionSigner(None))
    with TestClient(create_app(site.store, dashboard=dashboard)) as client:
        check_sign_in_limit(client)


def check_sign_in_limit(client: TestClient) -> None:
    good = {"username": "clerk", "password": PASSWORD}
    bad = {"username": "clerk", "password": "wrong"}
    # a whole office signing in from one address at nine
    assert [client.post("/dashboard/auth/login", json=good).status_code for _ in range(15)] == [
        200
    ] * 15
    codes = [client.post("/dashboard/auth/login", json=bad).status_code for _ in range(11)]
    assert codes == [401] * 10 + [429]
    assert client.post("/dashboard/auth/login", json=good).status_code == 429


# --------------------------------------------------------------------------- data


def test_overview_zone_and_device_data(site: Site, clients: list[httpx.Client]) -> None:
    viewer = signed_in(site, "viewer", clients)
    overview = viewer.get("/dashboard/api/overview").json()
    features = overview["zones"]["features"]
    assert len(features) == 4
    for f in features:
        assert f["geometry"]["type"] == "Polygon"
        assert isinstance(f["properties"]["aqi"], int) and f["properties"]["color"].startswith("#")
    assert overview["headline"]["devices_total"] == 8
    assert overview["summary"] is not None and overview["summary"]["scope"] == "city"
    for range_ in ("24h", "7d", "30d"):
        page = viewer.get("/dashboard/api/zones/harbour", params={"range": range_}).json()
        assert [c["metric"] for c in page["charts"]] == list(CHART_METRICS)
        assert {"co", "temperature", "relativehumidity", "occupancy"} <= set(CHART_METRICS)
        assert all(c["points"] for c in page["charts"]), range_
        assert any(g["value"] == 15.0 for c in page["charts"] for g in c["guides"])
    bad = viewer.get("/dashboard/api/zones/harbour", params={"range": "custom"})
    assert bad.status_code == 422
    assert viewer.get("/dashboard/api/zones/atlantis").status_code == 404
    devices = viewer.get("/dashboard/api/devices").json()
    assert len(devices) == 8 and all(d["model_version"] == "sim-history" for d in devices)
    assert {"online", "flagged_24h", "signature_or_chain_failures_24h", "health"} <= set(devices[0])


def test_live_readings_arrive_as_server_sent_events(
    site: Site, clients: list[httpx.Client]
) -> None:
    viewer = signed_in(site, "viewer", clients)
    with viewer.stream("GET", "/dashboard/api/live") as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        device = write_new_reading(site, 77.5)
        deadline = time.monotonic() + 10
        for line in lines:
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["device_id"] == device and event["metric"] == "no2":
                    assert event["value"] == 77.5
                    break
            assert time.monotonic() < deadline, "no live event"


def test_admin_registers_and_moves_devices_and_edits_zones(
    site: Site, clients: list[httpx.Client]
) -> None:
    admin = signed_in(site, "admin", clients)
    signer = Ed25519Signer.generate()
    body = {
        "public_key": signer.verify_key().to_text(),
        "zone": "harbour",
        "lat": 57.1,
        "lon": -2.1,
        "kind": "air",
    }
    made = admin.post("/dashboard/api/admin/devices", json=body)
    assert made.status_code == 201 and made.json()["device_id"] == signer.key_id
    assert admin.post("/dashboard/api/admin/devices", json=body).status_code == 409
    assert signer.key_id in Registry.load(site.registry).devices
    assert signer.key_id in {d.device_id for d in site.store.devices()}
    moved = admin.patch(f"/dashboard/api/admin/devices/{signer.key_id}", json={"zone": "old-town"})
    assert moved.status_code == 200
    assert Registry.load(site.registry).devices[signer.key_id].zone == "old-town"
    broken = admin.post("/dashboard/api/admin/devices", json={**body, "public_key": "x" * 44})
    assert broken.status_code == 422
    shape = {
        "type": "Polygon",
        "coordinates": [[[-2.1, 57.1], [-2.0, 57.1], [-2.0, 57.2], [-2.1, 57.1]]],
    }
    saved = admin.put(
        "/dashboard/api/admin/zones/harbour", json={"label": "Harbour & docks", "geometry": shape}
    )
    assert saved.status_code == 200
    overview = admin.get("/dashboard/api/overview").json()
    labels = {
        f["properties"]["zone"]: f["properties"]["label"] for f in overview["zones"]["features"]
    }
    assert labels["harbour"] == "Harbour & docks"
    open_ring = {"type": "Polygon", "coordinates": [[[-2.1, 57.1], [-2.0, 57.1], [-2.0, 57.2]]]}
    refused = admin.put(
        "/dashboard/api/admin/zones/harbour", json={"label": "x", "geometry": open_ring}
    )
    assert refused.status_code == 422


def test_trailing_means_are_weighted_and_need_coverage() -> None:
    hour = 3_600_000
    points = [
        SeriesPoint(h * hour, 2 if h % 2 else 1, float(h), float(h), float(h)) for h in range(48)
    ]
    del points[10:17]  # 7 hours missing: the windows that hold them are under 75 % covered
    means = {p["t"]: p["mean"] for p in trailing_means(points, 24 * hour, 48 * hour, 24)}
    # the window ending with hour 47 holds hours 24..47, odd hours counted twice
    expected = sum(h * (2 if h % 2 else 1) for h in range(24, 48)) / sum(
        2 if h % 2 else 1 for h in range(24, 48)
    )
    assert means[iso(47 * hour)] == pytest.approx(expected, abs=1e-3)
    # hours 24..32 see 7 missing hours among 24 (17 < 18): no value
    assert iso(30 * hour) not in means and iso(40 * hour) in means


def test_charts_set_24h_guidelines_against_24h_means(
    site: Site, clients: list[httpx.Client]
) -> None:
    viewer = signed_in(site, "viewer", clients)
    zones = [
        f["properties"]["zone"]
        for f in viewer.get("/dashboard/api/overview").json()["zones"]["features"]
    ]
    for zone in zones:
        page = viewer.get(f"/dashboard/api/zones/{zone}", params={"range": "24h"}).json()
        charts = {c["metric"]: c for c in page["charts"]}
        pm = charts["pm25"]
        # every zone's PM2.5 chart has the line, and it is read against the 24-h mean
        assert pm["resolution"] == "1h"
        assert pm["guides"] == [
            {
                "label": "WHO 2021 24-h guideline",
                "value": 15.0,
                "averaging": "24h",
                "over": "average",
            }
        ]
        assert pm["average"]["hours"] == 24 and pm["average"]["points"]
        last = pm["average"]["points"][-1]
        t = int(datetime.fromisoformat(last["t"].replace("Z", "+00:00")).timestamp() * 1000)
        # independently: the zone's count-weighted mean of the 24 hours ending there
        day = [
            a
            for a in site.store.zone_aggregates(t - 23 * 3_600_000, t + 3_600_000)
            if a.zone == zone and a.metric == "pm25"
        ]
        assert last["mean"] == pytest.approx(day[0].mean, abs=1e-3)
        assert charts["o3"]["guides"][0]["value"] == 100.0 and charts["o3"]["average"]["hours"] == 8
        assert charts["temperature"]["guides"] == [] and charts["temperature"]["unit"] == "°C"
        assert not any(g["value"] == 200.0 for c in page["charts"] for g in c["guides"])
    month = viewer.get("/dashboard/api/zones/harbour", params={"range": "30d"}).json()
    charts = {c["metric"]: c for c in month["charts"]}
    # daily points are 24-h means already; a day's mean is no 8-h mean
    assert charts["pm25"]["resolution"] == Resolution.DAY.label
    assert charts["pm25"]["guides"][0]["over"] == "points" and charts["pm25"]["average"] is None
    assert charts["o3"]["guides"] == []


def test_metric_names_units_and_alerts_by_role(site: Site, clients: list[httpx.Client]) -> None:
    viewer = signed_in(site, "viewer", clients)
    metrics = viewer.get("/dashboard/api/me").json()["metrics"]
    assert metrics["relativehumidity"] == {"label": "Relative humidity", "unit": "%", "digits": 0}
    assert metrics["pm25"]["label"] == "PM2.5" and metrics["pm25"]["unit"] == "µg/m³"
    assert viewer.get("/dashboard/api/alerts").status_code == 403
    anonymous = httpx.Client(base_url=site.url, timeout=10)
    clients.append(anonymous)
    assert anonymous.get("/dashboard/api/alerts").status_code == 401
    log = AlertLog(site.alerts, readonly=True)
    try:
        expected = sorted(a.id for a in log.open_alerts())
    finally:
        log.close()
    assert expected, "the fixture's PM2.5 rule opened no alert"
    for role in ("operator", "admin"):
        body = signed_in(site, role, clients).get("/dashboard/api/alerts").json()
        assert body["configured"] is True
        assert sorted(a["id"] for a in body["open"]) == expected
        assert all(a["rule_id"] == "pm25-who" for a in body["open"])


def test_device_rows_count_fault_flags_and_quarantined_batches(
    site: Site, clients: list[httpx.Client]
) -> None:
    viewer = signed_in(site, "viewer", clients)
    before = {d["device_id"]: d for d in viewer.get("/dashboard/api/devices").json()}
    flagged, victim = inject_fault_and_quarantine(site)
    after = {d["device_id"]: d for d in viewer.get("/dashboard/api/devices").json()}
    assert after[flagged]["flagged_24h"] == before[flagged]["flagged_24h"] + 1
    assert after[victim]["quarantined_total_24h"] == before[victim]["quarantined_total_24h"] + 1
    assert after[victim]["quarantined_24h"].get("signature.invalid", 0) >= 1


def inject_fault_and_quarantine(site: Site) -> tuple[str, str]:
    """A stuck-flagged reading from one device and a forged batch quarantined in
    another's name, as the edge checks and ingest record them."""
    flagged = write_new_reading(site, 42.0, int(Quality.STUCK), index=2)
    victim = history_devices(site.city)[3].signer.key_id
    site.store.add_quarantine(
        [
            QuarantineRecord.of(
                reason="signature.invalid",
                detail="test: a forged batch",
                source="ingest:test",
                topic="civicmesh/v1/batches",
                received_at_ms=now_ms(),
                payload=b"forged",
                device_id=victim,
                seq=1,
            )
        ]
    )
    return flagged, victim


# ------------------------------------------------------------------------ browser


def check_axes(scope: Any, *, dated: bool) -> None:
    """Every chart's value ticks are evenly spaced on a 1, 2 or 5 x 10^n step, and its
    time axis names a date."""
    charts = scope.locator("figure.chart svg").evaluate_all(
        """els => els.map(e => ({
            y: [...e.querySelectorAll('.y-tick')].map(t => Number(t.textContent.replace(/,/g, ''))),
            x: [...e.querySelectorAll('.x-tick')].map(
                t => [...t.querySelectorAll('tspan')].map(s => s.textContent).join(' '))}))"""
    )
    assert charts
    for chart in charts:
        ys = chart["y"]
        assert len(ys) >= 3, chart
        steps = {round(b - a, 9) for a, b in itertools.pairwise(ys)}
        assert len(steps) == 1, chart
        step = steps.pop()
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert round(mantissa, 6) in (1.0, 2.0, 5.0), chart
        assert all(round(v / step, 6).is_integer() for v in ys), chart
        assert len(chart["x"]) >= 2, chart
        if dated:
            assert any(re.search(r"\b\d{1,2} [A-Z][a-z]{2}\b", x) for x in chart["x"]), chart


@pytest.mark.slow
def test_every_page_in_a_real_browser(site: Site) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    figures: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1024, "height": 768})  # a tablet
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{site.url}/dashboard/")
        # before sign-in: no Admin link; a wrong password shows the server's reason
        expect(page.get_by_label("User name")).to_be_visible()
        expect(page.get_by_role("link", name="Admin")).to_be_hidden()
        page.get_by_label("User name").fill("admin")
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text("Unknown user or wrong password")
        expect(page.get_by_role("link", name="Admin")).to_be_hidden()
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("link", name="Admin")).to_be_visible()

        # overview: every zone drawn and coloured, devices on the map, the city summary
        expect(page.locator("path.zone")).to_have_count(4)
        fills = page.locator("path.zone").evaluate_all(
            "els => els.map(e => e.getAttribute('fill'))"
        )
        assert all(f and f != "#9e9e9e" for f in fills), fills
        placed = [d for d in site.store.devices() if d.lat is not None and d.lon is not None]
        expect(page.locator("circle.device")).to_have_count(len(placed))
        expect(page.locator("#city-summary")).not_to_be_empty()
        # open alerts, as the alert log holds them, in a panel on top
        log = AlertLog(site.alerts, readonly=True)
        try:
            open_alerts = len(log.open_alerts())
        finally:
            log.close()
        expect(page.locator("#alerts li[data-rule='pm25-who']")).to_have_count(open_alerts)
        expect(page.locator("#alerts h3")).to_have_text(f"{open_alerts} open alerts")
        # zone labels: one per zone, none overlapping another
        expect(page.locator("text.label")).to_have_count(4)
        boxes = [
            [float(v) for v in b.split(",")]
            for b in page.locator("text.label").evaluate_all(
                "els => els.map(e => { const b = e.getBBox(); "
                "return [b.x, b.y, b.width, b.height].join(','); })"
            )
        ]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                apart = (
                    a[0] + a[2] <= b[0]
                    or b[0] + b[2] <= a[0]
                    or a[1] + a[3] <= b[1]
                    or b[1] + b[3] <= a[1]
                )
                assert apart, (a, b)
        assert page.locator("g.scale").get_attribute("data-metres") is not None
        # the legend's colours show (set through the CSSOM: the CSP refuses style attributes)
        swatches = page.locator(".legend .swatch").evaluate_all(
            "els => els.map(e => getComputedStyle(e).backgroundColor)"
        )
        assert "rgba(0, 0, 0, 0)" not in swatches and len(set(swatches)) == 7, swatches
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # live: a reading stored now appears without a reload
        write_new_reading(site, 55.5)
        expect(page.locator("#live-list li").first).to_contain_text(
            "NO₂ 55.5 µg/m³", timeout=10_000
        )
        page.screenshot(path=str(ARTIFACTS / "live.png"))

        # first paint of the overview on a fresh load, signed in
        page.goto(f"{site.url}/dashboard/#/overview")
        expect(page.locator("path.zone")).to_have_count(4)
        figures["first_contentful_paint_ms"] = page.evaluate(
            "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"
        )
        figures["overview_ready_ms"] = page.evaluate("performance.now()")

        # zone page by keyboard: focus a zone on the map and press Enter
        page.locator("path.zone[data-zone='harbour']").focus()
        page.keyboard.press("Enter")
        expect(page.locator("figure.chart")).to_have_count(len(CHART_METRICS))
        check_axes(page, dated=True)
        page.get_by_role("button", name="7 days").click()
        expect(page.get_by_role("button", name="7 days")).to_have_attribute("aria-pressed", "true")
        expect(page).to_have_title(re.compile(r"^(harbour|Harbour & docks), 7d — civicmesh$"))
        expect(page.locator("figure.chart[data-metric='pm25'] polyline.line")).to_have_count(1)
        counts = page.locator("figure.chart").evaluate_all(
            "els => els.map(e => [e.dataset.metric, Number(e.dataset.points)])"
        )
        assert len(counts) == len(CHART_METRICS) and all(n > 24 for _, n in counts), counts
        check_axes(page, dated=True)
        # guidelines: on PM2.5, PM10, NO2, O3 and CO, each with the trailing mean it is read against
        expect(page.locator("line.guide[data-over='average']")).to_have_count(5)
        expect(page.locator("figure.chart:has(line.guide) polyline.avg-line")).to_have_count(5)
        expect(page.get_by_text("Daily report")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "zone.png"), full_page=True)

        # device health
        flagged, victim = inject_fault_and_quarantine(site)
        page.get_by_role("link", name="Devices").click()
        expect(page.locator("#devices tbody tr")).to_have_count(len(site.store.devices()))
        expect(page.locator(f"#devices tr[data-device='{flagged}'] td.flags")).to_contain_text(
            "flagged"
        )
        expect(page.locator(f"#devices tr[data-device='{victim}'] td.quarantine")).to_contain_text(
            "signature.invalid"
        )
        page.screenshot(path=str(ARTIFACTS / "devices.png"), full_page=True)
        # on a phone (390 px) the page never scrolls sideways
        page.set_viewport_size({"width": 390, "height": 844})
        for where in ("#/devices", "#/overview", "#/zone/harbour"):
            page.goto(f"{site.url}/dashboard/{where}")
            expect(page.locator("main h2")).to_be_visible()
            page.wait_for_load_state("networkidle")
            sizes = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert sizes[0] <= sizes[1], (where, sizes)
            page.screenshot(
                path=str(ARTIFACTS / f"phone-{where[2:].replace('/', '-')}.png"), full_page=True
            )
        page.set_viewport_size({"width": 1024, "height": 768})

        # ask: the answer, its facts and a chart
        page.get_by_role("link", name="Ask").click()
        page.get_by_label("Your question").fill("How was NO2 in harbour yesterday?")
        page.get_by_role("button", name="Ask").click()
        expect(page.locator("#answer-text")).to_contain_text("NO2", timeout=20_000)
        assert page.locator("#answer table.facts tbody tr").count() >= 1
        points = page.locator("#answer figure.chart").first.get_attribute("data-points")
        assert points is not None and int(points) > 0
        expect(page.locator("#answer figure.chart h3").first).to_contain_text(
            "NO₂ — harbour (µg/m³)"
        )
        check_axes(page.locator("#answer"), dated=True)
        page.screenshot(path=str(ARTIFACTS / "ask.png"), full_page=True)
        page.get_by_label("Your question").fill("How was NO2 in harbr yesterday?")
        page.get_by_role("button", name="Ask").click()
        expect(page.get_by_role("alert")).to_contain_text("harbour")

        # admin pages
        page.get_by_role("link", name="Admin").click()
        expect(page.locator("#register-form")).to_be_visible()
        newcomer = Ed25519Signer.generate()
        form = page.locator("#register-form")
        form.get_by_label("Public key (base64 Ed25519)").fill(newcomer.verify_key().to_text())
        form.get_by_label("Zone").fill("university")
        form.get_by_role("button", name="Register").click()
        expect(page.locator("#admin-result")).to_contain_text(f"Registered {newcomer.key_id}")
        move = page.locator("#move-form")
        move.get_by_label("Device id").fill(newcomer.key_id)
        move.get_by_label("New zone").fill("ring-road")
        move.get_by_role("button", name="Move").click()
        expect(page.locator("#admin-result")).to_contain_text("to ring-road")
        assert Registry.load(site.registry).devices[newcomer.key_id].zone == "ring-road"
        expect(page.get_by_role("form", name="Edit zone harbour")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)

        # a viewer: no Admin link, no alerts panel
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("User name")).to_be_visible()
        expect(page.get_by_role("link", name="Admin")).to_be_hidden()
        page.get_by_label("User name").fill("viewer")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("path.zone")).to_have_count(4)
        expect(page.get_by_role("link", name="Admin")).to_be_hidden()
        expect(page.locator("#alerts")).to_have_count(0)
        browser.close()
    (ARTIFACTS / "figures.json").write_text(json.dumps(figures, indent=2))
    # nothing but the app itself was asked for anything
    foreign = [u for u in requested if not u.startswith(f"{site.url}/")]
    assert requested and foreign == [], foreign
