"""One wiring: the demo's central service is ``analytics.app.build`` with demo settings, so
its API keeps the tokens, rate limits, body limit and window of production."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from analytics.apiauth import TokenFile
from analytics.app import Services, build
from analytics.settings import AnalyticsSettings
from civicmesh.config import load_settings
from demo.cli import register_demo
from demo.demo import Demo

ADMIN_CALL = ("POST", "/api/v1/admin/devices", {"public_key": "ed25519:AAAA", "zone": "north"})


def _demo(state: Path) -> Demo:
    parser = argparse.ArgumentParser()
    register_demo(parser.add_subparsers())
    args = parser.parse_args(["demo", "--state-dir", str(state), "--devices", "4", "--zones", "2"])
    return Demo(args)


@pytest.fixture
def demo_api(tmp_path: Path) -> Iterator[tuple[Services, dict[str, str]]]:
    demo = _demo(tmp_path / "demo")
    _, _, tokens = demo.prepare()
    settings = demo.central_settings("mqtt://127.0.0.1:1", f"sqlite:///{tmp_path / 'demo.db'}")
    services = build(settings, roles=("api",))
    assert services is not None
    with services:
        yield services, tokens


@pytest.fixture
def production_api(tmp_path: Path) -> Iterator[Services]:
    """``civicmesh api run --config central.toml`` with a tokens file, as the runbook says."""
    tokens = tmp_path / "prod" / "api-tokens.json"
    TokenFile(tokens).add("ops", "admin")
    config = tmp_path / "central.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "prod.db"}"\n'
        f'registry_file = "{tmp_path / "prod" / "registry.json"}"\n'
        f'[api]\ntokens_file = "{tokens}"\n'
        "[reports]\nschedule = false\n"
    )
    services = build(load_settings(AnalyticsSettings, config), roles=("api",))
    assert services is not None
    with services:
        yield services


def _call(services: Services, token: str | None = None) -> tuple[int, object, str | None]:
    assert services.api is not None
    method, path, body = ADMIN_CALL
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with TestClient(services.api.app) as client:
        response = client.request(method, path, json=body, headers=headers)
    return response.status_code, response.json(), response.headers.get("www-authenticate")


def test_the_demo_api_refuses_an_unauthenticated_admin_call_like_production(
    demo_api: tuple[Services, dict[str, str]], production_api: Services
) -> None:
    services, _ = demo_api
    refused = _call(services)
    assert refused[0] == 401
    assert refused == _call(production_api)


def test_the_demo_tokens_carry_their_roles(demo_api: tuple[Services, dict[str, str]]) -> None:
    services, tokens = demo_api
    assert set(tokens) == {"viewer", "operator", "admin"}
    assert _call(services, tokens["viewer"])[0] == 403
    assert _call(services, tokens["operator"])[0] == 403
    status, body, _ = _call(services, tokens["admin"])
    assert status not in (401, 403, 429), body  # past the door: the request itself is judged


def test_the_demo_api_has_production_limits(demo_api: tuple[Services, dict[str, str]]) -> None:
    services, _ = demo_api
    defaults = AnalyticsSettings()
    assert services.settings.api.rate_per_s == defaults.api.rate_per_s
    assert services.settings.api.rate_burst == defaults.api.rate_burst
    assert services.settings.api.max_body_bytes == defaults.api.max_body_bytes
    assert services.settings.reports.window_s == defaults.reports.window_s
    assert services.api is not None
    with TestClient(services.api.app) as client:
        huge = client.post(
            "/api/v1/ask",
            content=b"x" * (defaults.api.max_body_bytes + 1),
            headers={"content-type": "application/json"},
        )
    assert huge.status_code == 413


def test_build_rejects_an_unknown_role(tmp_path: Path) -> None:
    settings = AnalyticsSettings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="unknown roles"):
        build(settings, roles=("ingest", "frontend"))
