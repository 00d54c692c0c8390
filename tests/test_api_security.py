"""API security: tokens with roles (every role against every endpoint), rate and size
limits, CORS closed by default, and start-up refusing development defaults in production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from analytics.api import create_app
from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
from analytics.reports.service import ReportService
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.identity import Ed25519Signer
from civicmesh.registry import DeviceRecord, Registry, RegistryFile

ROLES = ("viewer", "operator", "admin")
NOW = datetime.now(UTC)
DAY_AGO = (NOW - timedelta(days=1)).isoformat()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Path, Store]]:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    device = Ed25519Signer.generate()
    record = DeviceRecord(device.key_id, device.verify_key().to_text(), "harbour")
    registry_path = tmp_path / "registry.json"
    Registry.empty().with_device(record).save(registry_path)
    store.upsert_devices([record])
    tokens = TokenFile(tmp_path / "tokens.json")
    issued = {role: tokens.add(f"{role}-user", role) for role in ROLES}
    issued["device"] = device.key_id
    # every anonymous and wrong-token probe of the matrix comes from one address
    security = ApiSecurity(tokens, RateLimiter(1000, 1000), RateLimiter(1000, 1000))
    app = create_app(
        store,
        registry=RegistryFile(registry_path),
        stats_provider=lambda: {},
        reports=ReportService(store, None),
        security=security,
    )
    with TestClient(app) as client:
        yield client, issued, registry_path, store
    store.close()


def endpoints(device_id: str) -> list[tuple[str, str, dict[str, Any] | None, str, int]]:
    """(method, path, JSON body, least role, success status) for every API route."""
    window = {"start": DAY_AGO, "end": NOW.isoformat()}
    q = "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in window.items())
    key = Ed25519Signer.generate().verify_key().to_text()
    return [
        ("GET", "/api/v1/health", None, "viewer", 200),
        ("GET", "/api/v1/devices", None, "viewer", 200),
        ("GET", "/api/v1/zones", None, "viewer", 200),
        ("GET", "/api/v1/latest", None, "viewer", 200),
        ("GET", f"/api/v1/series?metric=no2&zone=harbour&{q}", None, "viewer", 200),
        ("GET", f"/api/v1/completeness?{q}", None, "viewer", 200),
        ("GET", f"/api/v1/aggregates?{q}", None, "viewer", 200),
        ("GET", f"/api/v1/export.csv?{q}", None, "viewer", 200),
        ("GET", f"/api/v1/ledger/{device_id}", None, "viewer", 200),
        ("GET", f"/api/v1/facts?zone=harbour&{q}", None, "viewer", 200),
        ("GET", "/api/v1/reports", None, "viewer", 200),
        ("GET", f"/api/v1/accounting/scores?day={NOW.date().isoformat()}", None, "viewer", 200),
        ("POST", "/api/v1/ask", {"question": "NO2 in harbour yesterday"}, "viewer", 200),
        ("GET", "/api/v1/quarantine", None, "operator", 200),
        ("GET", "/api/v1/alerts", None, "operator", 200),
        ("GET", "/metrics", None, "operator", 200),
        ("POST", "/api/v1/reports", {"kind": "daily", "zone": "harbour"}, "operator", 200),
        ("POST", "/api/v1/reports/due", None, "operator", 200),
        ("POST", "/api/v1/admin/devices", {"public_key": key, "zone": "harbour"}, "admin", 201),
        ("POST", f"/api/v1/admin/devices/{device_id}/revoke", None, "admin", 200),
    ]


def test_authorization_matrix_every_role_against_every_endpoint(setup: Any) -> None:
    client, issued, _, _ = setup
    callers: dict[str, dict[str, str]] = {
        "anonymous": {},
        "bad token": {"Authorization": "Bearer cm_not-a-token"},
        **{role: {"Authorization": f"Bearer {issued[role]}"} for role in ROLES},
    }
    routes = endpoints(issued["device"])
    seen = set()
    for caller, headers in callers.items():
        # fresh targets for the state-changing admin routes, in role order
        for method, path, body, least, ok in endpoints(issued["device"]):
            response = client.request(method, path, json=body, headers=headers)
            if caller in ("anonymous", "bad token"):
                expected = 401
            elif ROLES.index(caller) < ROLES.index(least):
                expected = 403
            else:
                expected = ok
            assert response.status_code == expected, (caller, method, path, response.text)
            seen.add((method, path.split("?")[0]))
    # the matrix covers every route the app serves under /api/v1 (and /metrics)
    schema = client.get("/openapi.json").json()["paths"]
    served = {
        (method.upper(), path.replace("{device_id}", issued["device"]))
        for path, ops in schema.items()
        for method in ops
        if path.startswith("/api/v1") and not path.startswith(PUBLIC)
    } | {("GET", "/metrics")}
    assert served <= seen, served - seen
    assert len(routes) == len(served)
    # the public audit log answers anyone, token or not
    public = {path for path in schema if path.startswith(PUBLIC)}
    assert public == {f"{PUBLIC}/{p}" for p in PUBLIC_PATHS}
    for headers in callers.values():
        response = client.get(f"{PUBLIC}/proof/consistency?from=0&to=0", headers=headers)
        assert response.status_code == 200, response.text
        assert client.get(f"{PUBLIC}/checkpoint", headers=headers).status_code == 404  # none yet


PUBLIC = "/api/v1/audit"
PUBLIC_PATHS = (
    "checkpoint",
    "proof/inclusion",
    "proof/consistency",
    "tile/{path}",
    "registry",
)


def test_rate_and_size_limits(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    tokens = TokenFile(tmp_path / "tokens.json")
    token = tokens.add("dashboard-kiosk", "viewer")
    app = create_app(
        store,
        reports=ReportService(store, None),
        security=ApiSecurity(tokens, RateLimiter(0.5, 3)),
        max_body_bytes=2048,
    )
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {token}"}
        codes = [client.get("/api/v1/zones", headers=auth).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        big = client.post(
            "/api/v1/ask",
            content=b"{" + b" " * 5000 + b"}",
            headers={**auth, "content-type": "application/json"},
        )
        assert big.status_code == 413
    store.close()


def test_cors_is_closed_unless_origins_are_named(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(store)) as client:
        response = client.options("/api/v1/zones", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    app = create_app(store, cors_origins=("https://city.example",))
    with TestClient(app) as client:
        allowed = client.options(
            "/api/v1/zones", headers={**preflight, "Origin": "https://city.example"}
        )
        assert allowed.headers.get("access-control-allow-origin") == "https://city.example"
        denied = client.options("/api/v1/zones", headers=preflight)
        assert "access-control-allow-origin" not in denied.headers
    store.close()


def test_tokens_are_kept_as_hashes_and_revoked_at_once(setup: Any, tmp_path: Path) -> None:
    client, issued, _, _ = setup
    text = (tmp_path / "tokens.json").read_text()
    assert all(issued[role] not in text for role in ROLES)
    assert oct((tmp_path / "tokens.json").stat().st_mode)[-3:] == "600"
    auth = {"Authorization": f"Bearer {issued['viewer']}"}
    assert client.get("/api/v1/zones", headers=auth).status_code == 200
    assert TokenFile(tmp_path / "tokens.json").revoke("viewer-user")
    assert client.get("/api/v1/zones", headers=auth).status_code == 401


def test_admin_revocation_reaches_the_registry(setup: Any) -> None:
    client, issued, registry_path, store = setup
    auth = {"Authorization": f"Bearer {issued['admin']}"}
    response = client.post(f"/api/v1/admin/devices/{issued['device']}/revoke", headers=auth)
    assert response.status_code == 200 and response.json()["status"] == "revoked"
    assert Registry.load(registry_path).devices[issued["device"]].status == "revoked"
    assert RegistryFile(registry_path).device_key(issued["device"]) is None
    assert {d.device_id: d.status for d in store.devices()}[issued["device"]] == "revoked"


def test_production_refuses_development_defaults(tmp_path: Path) -> None:
    settings = AnalyticsSettings(
        environment="production", database_url="postgresql://u:pw@db/civicmesh"
    )
    problems = settings.production_problems(serving_api=True)
    assert any("mqtts" in p for p in problems)
    assert any("tokens_file" in p for p in problems)
    assert any("session_secret" in p for p in problems)
    assert any("database_url_file" in p for p in problems)
    assert AnalyticsSettings().production_problems(serving_api=True) == []  # development
    weak = tmp_path / "weak"
    weak.write_text("change-me")
    settings = AnalyticsSettings(environment="production", dashboard={"session_secret_file": weak})
    assert any("default" in p for p in settings.production_problems(serving_api=True))
    env = {
        **os.environ,
        "CIVICMESH_ENVIRONMENT": "production",
        "CIVICMESH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
    }
    for command in (["api", "run", "--port", "1"], ["ingest", "run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "civicmesh.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert "environment is production" in proc.stderr and "mqtts" in proc.stderr


def test_token_cli_prints_once_and_stores_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "civicmesh.cli",
            "api",
            "add-token",
            "--file",
            str(path),
            "--name",
            "grafana",
            "--role",
            "viewer",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = proc.stdout.strip()
    assert token.startswith("cm_") and token not in path.read_text()
    assert json.loads(path.read_text())["tokens"][0]["name"] == "grafana"
    assert TokenFile(path).authenticate(token) is not None


def test_admin_registers_a_device_with_zone_location_and_owner(setup: Any) -> None:
    client, issued, registry_path, store = setup
    signer = Ed25519Signer.generate()
    body = {
        "public_key": signer.verify_key().to_text(),
        "zone": "old-town",
        "lat": 57.15,
        "lon": -2.1,
        "kind": "air",
        "owner": "Old Town Residents' Association",
    }
    made = client.post(
        "/api/v1/admin/devices", json=body, headers={"Authorization": f"Bearer {issued['admin']}"}
    )
    assert made.status_code == 201 and made.json()["device_id"] == signer.key_id
    record = Registry.load(registry_path).devices[signer.key_id]
    assert (record.zone, record.lat, record.owner) == ("old-town", 57.15, body["owner"])
    assert signer.key_id in {d.device_id for d in store.devices()}
