"""deploy/compose.yaml with the files ``setup central`` writes.

- ``docker-compose config`` (Debian's 1.29) accepts the file and interpolates it;
- ``promtool check config`` accepts deploy/prometheus.yml;
- each service's interpolated command runs, with that service's environment, as a
  process on 127.0.0.1 (the volumes are mounted at the host's own paths, so a process
  sees what the container would): the broker with TLS and the ACL, both ingest workers,
  the API over HTTPS. The PostgreSQL service is stood in for by the shared server (a
  fresh database), the Prometheus service by ``promtool``.

Running the stack in real containers needs a base image made with debootstrap (minutes)
and a dockerd; that is ``test_compose_stack_in_docker`` (marked slow, see there).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import create_database, drop_database, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLI = str(Path(sys.executable).parent / "civicmesh")
pytestmark = pytest.mark.integration


@pytest.fixture
def site() -> Iterator[dict[str, Any]]:
    """A central site made by `setup central`, as compose expects it (uid 10001 owns
    the secrets when we are root; the broker's key belongs to uid 1883)."""
    base = Path(tempfile.mkdtemp(prefix="civicmesh-compose-"))
    base.chmod(0o755)
    db = create_database()
    # a password in the URL, as a real site has (the shared test server trusts loopback)
    url = db.replace("postgresql://postgres@", "postgresql://postgres:compose%2Fpw@")
    assert url != db, db
    try:
        ports = {"mqtt": free_port(), "api": free_port()}
        user = "10001" if os.geteuid() == 0 else ""
        made = subprocess.run(
            [CLI, "setup", "central", "--dir", str(base / "site"), "--state-dir",
             str(base / "state"), "--broker-state-dir", str(base / "broker"),
             "--host", "127.0.0.1", "--mqtt-port", str(ports["mqtt"]), "--api-port",
             str(ports["api"]), "--api-host", "127.0.0.1", "--database-url", url,
             "--llm-backend", "none", "--user", user, "--broker-user", "1883"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        env = {
            "CIVICMESH_SITE": str(base / "site"),
            "CIVICMESH_STATE": str(base / "state"),
            "CIVICMESH_BROKER_STATE": str(base / "broker"),
        }
        yield {"base": base, "ports": ports, "env": env, "db": db, "user": user}
    finally:
        drop_database(db)
        shutil.rmtree(base, ignore_errors=True)


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    """The file as docker-compose reads it, variables interpolated."""
    assert shutil.which("docker-compose"), "apt-get install docker-compose"
    proc = subprocess.run(
        ["docker-compose", "-f", str(DEPLOY / "compose.yaml"), "--profile", "metrics", "config"],
        capture_output=True, text=True, timeout=60, env=os.environ | env, cwd=DEPLOY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def test_prometheus_config_is_valid() -> None:
    assert shutil.which("promtool"), "apt-get install prometheus (promtool)"
    proc = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(DEPLOY / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _as_process(service: dict[str, Any], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A compose service's command as a host process: the image's entrypoint
    (``civicmesh`` for the project's image) before its command, its environment."""
    command = list(service["command"])
    image = service.get("image", "")
    argv = command if command[0] == "mosquitto" else [CLI, *command]
    if argv[0] == "mosquitto":
        argv[0] = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    assert image, service
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}
    proc_env |= {k: str(v) for k, v in (service.get("environment") or {}).items()}
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        target = volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
        assert source == target or target.startswith("/etc/prometheus"), volume
    return argv, proc_env | {"CIVICMESH_TEST_ENV": "1"}


def test_compose_services_run_as_processes_with_setups_files(site: dict[str, Any]) -> None:
    config = compose_config(site["env"])
    services = config["services"]
    assert {"mosquitto", "timescaledb", "ingest-1", "ingest-2", "api", "prometheus"} <= set(
        services
    )
    # the services run as the uid that owns the secrets; the broker as its key's owner
    assert services["api"]["user"] == "10001:10001" and services["mosquitto"]["user"] == "1883:1883"
    secrets = Path(site["env"]["CIVICMESH_SITE"]) / "secrets"
    if os.geteuid() == 0:
        assert {p.stat().st_uid for p in secrets.iterdir()} == {10001}
    assert (secrets / "pg_password").read_text() == "compose/pw\n"  # unquoted for PostgreSQL
    assert services["timescaledb"]["environment"]["POSTGRES_PASSWORD_FILE"] == str(
        secrets / "pg_password"
    )
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs = site["base"]
    try:
        for name in ("mosquitto", "ingest-1", "ingest-2", "api"):
            argv, env = _as_process(services[name], site["env"])
            if os.geteuid() == 0:  # as the container would: the service's own uid
                uid = services[name]["user"].split(":")[0]
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
            log = (logs / f"{name}.log").open("wb")
            started.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                   env=env)))  # fmt: skip
            log.close()
            if name == "mosquitto":
                assert wait_for_port(site["ports"]["mqtt"], 15), (
                    logs / "mosquitto.log"
                ).read_text()
        assert wait_for_port(site["ports"]["api"], 90), (logs / "api.log").read_text()
        ca = ssl.create_default_context(
            cafile=str(Path(site["env"]["CIVICMESH_SITE"]) / "pki/ca.crt")
        )
        token = (secrets / "api-admin.token").read_text().strip()
        with httpx.Client(verify=ca, timeout=10) as client:
            health = client.get(f"https://127.0.0.1:{site['ports']['api']}/api/v1/health",
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert health.status_code == 200, health.text
        assert health.json()["store_backend"] in ("postgresql", "timescaledb")
        time.sleep(3)
        for name, proc in started:
            assert proc.poll() is None, (name, (logs / f"{name}.log").read_text()[-3000:])
        for name in ("ingest-1", "ingest-2"):
            text = (logs / f"{name}.log").read_text()
            assert "not reachable" not in text and "Traceback" not in text, text[-3000:]
    finally:
        for _, proc in reversed(started):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
