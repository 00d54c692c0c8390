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


# ----------------------------------------------------------------- real containers

BASE_TAR = ROOT / "var" / "docker-base" / "base.tar"  # cached debootstrap (gitignored)
WHEELS = ROOT / "build" / "wheels"  # pip wheel '.[analytics]' + setuptools, wheel
OVERRIDE = """
services:
  mosquitto:
    image: civicmesh:test
    network_mode: host
    entrypoint: ["/usr/bin/env"]
  timescaledb:            # no database image here: the shared PostgreSQL on the host
    image: civicmesh:test
    network_mode: host
    entrypoint: ["/usr/bin/env"]
    command: ["sleep", "infinity"]
    healthcheck: {disable: true}
  ingest-1: {image: "civicmesh:test", network_mode: host}
  ingest-2: {image: "civicmesh:test", network_mode: host}
  api: {image: "civicmesh:test", network_mode: host}
"""


@pytest.fixture
def dockerd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private dockerd (no iptables, no bridge, vfs), stopped by its pid afterwards."""
    if not (shutil.which("dockerd") and BASE_TAR.exists() and WHEELS.exists()):
        pytest.fail(
            "needs dockerd (apt-get install docker.io docker-compose), the base image tar "
            f"{BASE_TAR} (debootstrap --variant=minbase --include=python3,python3-venv,"
            f"mosquitto,ca-certificates bookworm ROOTFS; tar -C ROOTFS -cf {BASE_TAR} .) "
            f"and {WHEELS} (pip wheel '.[analytics]' setuptools wheel)",
            pytrace=False,
        )
    run_dir = Path(tempfile.mkdtemp(prefix="dockerd-"))
    sock = run_dir / "docker.sock"
    log = (run_dir / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--iptables=false", "--bridge=none", "--storage-driver=vfs",
         "--data-root", str(ROOT / "var" / "docker-data"), "--exec-root", str(run_dir / "x"),
         "--pidfile", str(run_dir / "pid"), "-H", f"unix://{sock}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {"DOCKER_HOST": f"unix://{sock}"}
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "info"], env=os.environ | env,
                             capture_output=True).returncode != 0:  # fmt: skip
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"dockerd did not start: {(run_dir / 'dockerd.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def docker(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=os.environ | env, cwd=DEPLOY)  # fmt: skip
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(
    not os.environ.get("CIVICMESH_DOCKER_TEST"),
    reason="opt-in (CIVICMESH_DOCKER_TEST=1): a debootstrap base and an image build under "
    "dockerd's vfs take 10+ minutes, more than CI's budget for one test",
)
def test_compose_stack_in_docker(site: dict[str, Any], dockerd: dict[str, str]) -> None:
    """The compose file run for real (docker-compose 1.29, host networking on private
    ports): broker, two ingest workers and the API in containers built from a debootstrap
    base, with setup central's files. Building the image takes a few minutes the first
    time (vfs copies every layer); the base and the wheels are cached under var/, build/."""
    docker(dockerd, "docker", "import", str(BASE_TAR), "civicmesh-base:bookworm")
    docker(dockerd, "docker", "build", "--network", "host", "-f", str(DEPLOY / "Dockerfile"),
           "--build-arg", "BASE=civicmesh-base:bookworm", "--build-arg",
           "PIP_ARGS=--no-index --find-links=/src/build/wheels", "-t", "civicmesh:test",
           str(ROOT))  # fmt: skip
    override = site["base"] / "override.yaml"
    override.write_text(OVERRIDE)
    compose = ["docker-compose", "-p", "civicmeshtest", "-f", str(DEPLOY / "compose.yaml"),
               "-f", str(override)]  # fmt: skip
    env = dockerd | site["env"]
    try:
        docker(env, *compose, "up", "-d", "--no-build", "mosquitto", "timescaledb", "ingest-1",
               "ingest-2", "api")  # fmt: skip
        assert wait_for_port(site["ports"]["api"], 120), docker(env, *compose, "logs")
        secrets = Path(site["env"]["CIVICMESH_SITE"]) / "secrets"
        ca = ssl.create_default_context(
            cafile=str(Path(site["env"]["CIVICMESH_SITE"]) / "pki/ca.crt")
        )
        token = (secrets / "api-admin.token").read_text().strip()
        with httpx.Client(verify=ca, timeout=10) as client:
            health = client.get(f"https://127.0.0.1:{site['ports']['api']}/api/v1/health",
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert health.status_code == 200, health.text
        time.sleep(3)
        states = docker(env, *compose, "ps")
        for name in ("mosquitto", "ingest-1", "ingest-2", "api"):
            line = next(ln for ln in states.splitlines() if f"_{name}_" in ln)
            assert " Up" in line, (states, docker(env, *compose, "logs", name))
    finally:
        docker(env, *compose, "down", "--remove-orphans", "-t", "20")
