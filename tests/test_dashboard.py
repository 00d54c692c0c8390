"""The dashboard: sign-in and roles, its data, live readings, admin pages, and a real
headless Chromium (Debian's, driven by Playwright) going through every page.

The server is the real app (uvicorn on a free loopback port) over a SQLite store holding
eight days of the simulated city, written as signed, chained batches.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from support import free_port, wait_for_port

from analytics.api import create_app
from analytics.dashboard.auth import SessionSigner, UserFile, check_password, hash_password
from analytics.dashboard.routes import Dashboard, seed_zone_shapes
from analytics.reports.service import ReportService, generate_due
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import Reading, make_payload, seal_batch, wrap_envelope
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
    dashboard = Dashboard(
        store,
        reports,
        users,
        SessionSigner(None),
        registry_path=registry,
        window_s=600,
        live_interval_s=0.2,
    )
    app = create_app(store, window_s=600, reports=reports, dashboard=dashboard)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for_port(port, 20)
    yield Site(f"http://127.0.0.1:{port}", store, city, registry)
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


def write_new_reading(site: Site, value: float = 42.0) -> str:
    """One more signed batch from the first device, as ingest would store it."""
    device = history_devices(site.city)[0]
    status = {d.device_id: d for d in site.store.devices()}[device.signer.key_id]
    last = site.store.ledger(device.signer.key_id, after_seq=(status.last_seq or 1) - 1, limit=1)
    seq = (status.last_seq or 0) + 1
    t = now_ms()
    payload = make_payload(
        device.signer.key_id,
        seq,
        last[0].payload_hash,
        t,
        [Reading(t - 1000, "no2", value)],
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
        assert {c["metric"] for c in page["charts"]} >= {"pm25", "no2", "vehicle_count"}
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


# ------------------------------------------------------------------------ browser


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
        page.get_by_label("User name").fill("admin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()

        # overview: every zone drawn and coloured, devices on the map, the city summary
        expect(page.locator("path.zone")).to_have_count(4)
        fills = page.locator("path.zone").evaluate_all(
            "els => els.map(e => e.getAttribute('fill'))"
        )
        assert all(f and f != "#9e9e9e" for f in fills), fills
        placed = [d for d in site.store.devices() if d.lat is not None and d.lon is not None]
        expect(page.locator("circle.device")).to_have_count(len(placed))
        expect(page.locator("#city-summary")).not_to_be_empty()
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        # live: a reading stored now appears without a reload
        write_new_reading(site, 55.5)
        expect(page.locator("#live-list li").first).to_contain_text("55.5", timeout=10_000)
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
        expect(page.locator("figure.chart")).to_have_count(6)
        page.get_by_role("button", name="7 days").click()
        expect(page.get_by_role("button", name="7 days")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("figure.chart[data-metric='pm25'] polyline")).to_have_count(1)
        counts = page.locator("figure.chart").evaluate_all(
            "els => els.map(e => [e.dataset.metric, Number(e.dataset.points)])"
        )
        assert len(counts) == 6 and all(n > 24 for _, n in counts), counts
        assert page.locator("line.guide").count() >= 1  # guideline lines (zero-height lines)
        expect(page.get_by_text("Daily report")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "zone.png"), full_page=True)

        # device health
        page.get_by_role("link", name="Devices").click()
        expect(page.locator("#devices tbody tr")).to_have_count(len(site.store.devices()))
        page.screenshot(path=str(ARTIFACTS / "devices.png"), full_page=True)

        # ask: the answer, its facts and a chart
        page.get_by_role("link", name="Ask").click()
        page.get_by_label("Your question").fill("How was NO2 in harbour yesterday?")
        page.get_by_role("button", name="Ask").click()
        expect(page.locator("#answer-text")).to_contain_text("NO2", timeout=20_000)
        assert page.locator("#answer table.facts tbody tr").count() >= 1
        points = page.locator("#answer figure.chart").first.get_attribute("data-points")
        assert points is not None and int(points) > 0
        page.screenshot(path=str(ARTIFACTS / "ask.png"), full_page=True)
        page.get_by_label("Your question").fill("How was NO2 in harbor yesterday?")
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
        browser.close()
    (ARTIFACTS / "figures.json").write_text(json.dumps(figures, indent=2))
    # nothing but the app itself was asked for anything
    foreign = [u for u in requested if not u.startswith(f"{site.url}/")]
    assert requested and foreign == [], foreign
