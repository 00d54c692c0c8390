"""Configuration: shipped examples load; unknown keys are rejected by name; env wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from analytics.settings import AnalyticsSettings
from civicmesh.config import load_settings
from civicmesh.errors import ConfigError
from edge.settings import EdgeSettings
from gateway.settings import GatewaySettings

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


@pytest.mark.parametrize(
    ("cls", "name"),
    [(EdgeSettings, "edge"), (GatewaySettings, "gateway"), (AnalyticsSettings, "analytics")],
)
def test_shipped_examples_load(cls: type, name: str) -> None:
    assert load_settings(cls, EXAMPLES / f"{name}.toml") is not None


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('window_s = 60\nwindow_secs = 30\n[mqtt]\nurll = "x"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_settings(EdgeSettings, path)
    assert "'window_secs'" in str(excinfo.value) and "'mqtt.urll'" in str(excinfo.value)


def test_bounds_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('window_s = 60\n[mqtt]\nurl = "mqtt://file:1883"\n')
    monkeypatch.setenv("CIVICMESH_EDGE_MQTT__URL", "mqtt://env:1883")
    assert load_settings(EdgeSettings, path).mqtt.url == "mqtt://env:1883"
    monkeypatch.setenv("CIVICMESH_EDGE_WINDOW_S", "0")
    with pytest.raises(ConfigError, match="window_s"):
        load_settings(EdgeSettings, path)
