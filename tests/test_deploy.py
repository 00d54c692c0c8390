"""deploy/: the systemd units pass `systemd-analyze verify`, the install script passes
shellcheck and runs as a dry run for both roles, the compose file refers to files that
exist, and the services speak systemd's notify protocol."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from civicmesh.systemd import Watchdog, notify

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VENV_CLI = Path(sys.executable).parent / "civicmesh"


@pytest.mark.parametrize("role", ["edge", "gateway"])
def test_systemd_units_verify(role: str, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "scripts/test.sh installs systemd"
    unit = (DEPLOY / "systemd" / f"civicmesh-{role}.service").read_text()
    assert "WatchdogSec=" in unit and "Type=notify" in unit and "Restart=always" in unit
    assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit
    # verify checks that ExecStart exists: point it at this checkout's civicmesh
    local = tmp_path / f"civicmesh-{role}.service"
    local.write_text(unit.replace("/opt/civicmesh/venv/bin/civicmesh", str(VENV_CLI)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_scripts_pass_shellcheck() -> None:
    assert shutil.which("shellcheck"), "scripts/test.sh installs shellcheck"
    scripts = [DEPLOY / "install.sh", *sorted((ROOT / "scripts").glob("*.sh"))]
    proc = subprocess.run(
        ["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("role", ["edge", "gateway"])
def test_install_script_dry_run(role: str) -> None:
    proc = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--role", role, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"pip install --disable-pip-version-check --no-input --upgrade {ROOT}[{role}]" in out
    assert f"/etc/systemd/system/civicmesh-{role}.service" in out
    assert f"systemctl enable civicmesh-{role}.service" in out
    # one step makes the key and the config naming it (they used to disagree)
    assert f"civicmesh setup {role} --config /etc/civicmesh/{role}.toml" in out
    bad = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--role", "toaster", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "--role edge or --role gateway" in bad.stderr


def test_compose_file_refers_to_shipped_files() -> None:
    """The rest is tests/test_compose.py: the services run with setup central's files."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"mosquitto", "timescaledb", "ingest-1", "ingest-2", "api"} <= set(compose["services"])
    mounts = [v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])]
    for mount in (m for m in mounts if m.startswith("./")):
        assert (DEPLOY / mount).exists(), mount
    assert all(
        "PASSWORD" not in k or k.endswith("_FILE")
        for s in compose["services"].values()
        for k in s.get("environment", {})
    )
    assert (DEPLOY / "Dockerfile").exists()


def test_notify_and_watchdog_reach_systemds_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        assert notify("READY=1")
        assert server.recv(64) == b"READY=1"
        dog = Watchdog()
        assert dog.interval_s == 1.0
        dog.tick()
        assert server.recv(64) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False  # not under systemd: nothing happens


def test_notify_never_blocks_on_a_receiver_that_does_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notify socket nobody reads fills after a few datagrams (10 on Linux); a blocking
    send then stalled the whole service (an edge agent stopped publishing ~20 s after
    start in the production-sequence test, whose sockets were read only at the end)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        results: list[bool] = []
        sender = threading.Thread(
            target=lambda: results.extend(notify("WATCHDOG=1") for _ in range(200)), daemon=True
        )
        sender.start()
        sender.join(timeout=10)
        assert not sender.is_alive(), "notify() blocked on a full socket"
        assert results[0] is True and results[-1] is False  # queued, then dropped
        assert server.recv(64) == b"WATCHDOG=1"  # what was queued is intact


def test_example_configs_load() -> None:
    from analytics.settings import AnalyticsSettings
    from civicmesh.config import load_settings
    from edge.settings import EdgeSettings
    from gateway.settings import GatewaySettings

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}
    assert env is not None
    for model, name in (
        (EdgeSettings, "edge"),
        (GatewaySettings, "gateway"),
        (AnalyticsSettings, "analytics"),
    ):
        load_settings(model, DEPLOY / "examples" / f"{name}.toml")
