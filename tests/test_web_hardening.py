"""Dashboard and API hardening (issue 16 item 13): security headers on every response,
HSTS over HTTPS, production refusing plain-HTTP session cookies, logout revoking the
session on the server, and wrong API tokens rate-limited before the 401."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from analytics.api import create_app
from analytics.apiauth import ApiSecurity, RateLimiter, TokenFile
from analytics.dashboard.auth import COOKIE, SessionSigner, UserFile
from analytics.dashboard.routes import Dashboard
from analytics.reports.service import ReportService
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def site(tmp_path: Path, store: Store) -> Iterator[tuple[TestClient, str]]:
    users = UserFile(tmp_path / "users.json")
    users.add("viewer", "viewer", PASSWORD)
    reports = ReportService(store, None)
    dashboard = Dashboard(store, reports, users, SessionSigner(None))
    tokens = TokenFile(tmp_path / "tokens.json")
    token = tokens.add("kiosk", "viewer")
    app = create_app(
        store,
        reports=reports,
        dashboard=dashboard,
        security=ApiSecurity(tokens, RateLimiter(1000, 1000)),
    )
    with TestClient(app) as client:
        yield client, token


def test_every_response_carries_the_security_headers(site: tuple[TestClient, str]) -> None:
    client, token = site
    for path, headers in (
        ("/dashboard/", {}),
        ("/api/v1/zones", {"Authorization": f"Bearer {token}"}),
        ("/api/v1/zones", {}),  # a 401 too
        ("/no/such/page", {}),  # and a 404
    ):
        response = client.get(path, headers=headers)
        h = response.headers
        assert "frame-ancestors 'none'" in h["content-security-policy"], path
        assert "script-src 'self'" in h["content-security-policy"], path
        assert h["x-frame-options"] == "DENY", path
        assert h["x-content-type-options"] == "nosniff", path
        assert h["referrer-policy"] == "no-referrer", path
        assert "strict-transport-security" not in h, "no HSTS over plain HTTP"
    secure = TestClient(client.app, base_url="https://testserver")
    assert "max-age=" in secure.get("/dashboard/").headers["strict-transport-security"]


def test_logout_revokes_the_session_on_the_server(site: tuple[TestClient, str]) -> None:
    client, _ = site
    login = client.post("/dashboard/auth/login", json={"username": "viewer", "password": PASSWORD})
    assert login.status_code == 200
    cookie = login.cookies[COOKIE]
    assert client.get("/dashboard/api/me").status_code == 200
    assert client.post("/dashboard/auth/logout").status_code == 200
    # a copy of the cookie kept elsewhere (another tab, a thief) no longer works
    client.cookies.set(COOKIE, cookie, path="/dashboard")
    assert client.get("/dashboard/api/me").status_code == 401


def test_wrong_tokens_are_rate_limited_before_the_401(site: tuple[TestClient, str]) -> None:
    client, _ = site
    codes = [
        client.get("/api/v1/zones", headers={"Authorization": f"Bearer cm_wrong{n}"}).status_code
        for n in range(15)
    ]
    assert codes[:10] == [401] * 10
    assert codes[10:] == [429] * 5, "a guesser gets 429s, not endless 401s"


def test_production_refuses_plain_http_session_cookies(tmp_path: Path) -> None:
    secret = tmp_path / "session.key"
    secret.write_bytes(b"s" * 16 + b"0123456789abcdef0123")
    settings = AnalyticsSettings(
        environment="production",
        dashboard={"session_secret_file": secret, "secure_cookies": False},
    )
    problems = settings.production_problems(serving_api=True)
    assert any("secure_cookies" in p for p in problems)
    fixed = AnalyticsSettings(
        environment="production",
        dashboard={"session_secret_file": secret, "secure_cookies": True},
    )
    assert not any("secure_cookies" in p for p in fixed.production_problems(serving_api=True))


def test_a_nul_in_a_query_parameter_is_a_clear_400(site: tuple[TestClient, str]) -> None:
    """Issue 16 item 15: it used to be a 503 carrying the database's error text."""
    client, token = site
    auth = {"Authorization": f"Bearer {token}"}
    response = client.get("/api/v1/latest", params={"zone": "harbour\x00x"}, headers=auth)
    assert response.status_code == 400
    assert "NUL" in response.json()["detail"]
    assert "zone" in response.json()["detail"]
    assert client.get("/api/v1/latest?zone=harbour", headers=auth).status_code != 400
