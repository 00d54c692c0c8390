"""The production sequence of docs/production.md, as processes on 127.0.0.1: setup
central, the broker and every central unit's exact ExecStart line (two ingest workers,
API over HTTPS, report scheduler, upkeep), one gateway and two edge devices set up and
enrolled the documented way, a batch end to end over TLS, the dashboard signed in over
HTTPS; then a revocation takes effect. Each unit also passes ``systemd-analyze verify``.

Two deviations from a real site, both for time: the devices window and publish every
second (CIVICMESH_EDGE_WINDOW_S / _PUBLISH_INTERVAL_S) instead of every minute, and the
API listens on loopback (``setup central --api-host 127.0.0.1``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
from support import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
CLI = str(Path(sys.executable).parent / "civicmesh")
CENTRAL_UNITS = ("broker", "ingest@", "api", "reports", "upkeep")
pytestmark = pytest.mark.integration


def unit_text(name: str) -> str:
    return (UNITS / f"civicmesh-{name}.service").read_text()


def exec_start(name: str, base: Path, instance: str = "") -> tuple[list[str], dict[str, str]]:
    """A unit's exact ExecStart argv and Environment, with /etc and /var/lib under ``base``."""
    text = unit_text(name)
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    argv = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        arg = word.replace("/opt/civicmesh/venv/bin/civicmesh", CLI).replace("%i", instance)
        argv.append(arg.replace("/etc/civicmesh", str(base / "site")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}
    for ln in text.splitlines():
        if ln.startswith("Environment="):
            key, _, value = ln.removeprefix("Environment=").partition("=")
            env[key] = value
    return argv, env


@pytest.mark.parametrize("name", [*CENTRAL_UNITS, "edge", "gateway"])
def test_units_verify(name: str, tmp_path: Path) -> None:
    text = unit_text(name)
    if name != "broker":
        assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=always" in text
    assert "ProtectSystem=strict" in text and "NoNewPrivileges=yes" in text
    file_name = f"civicmesh-{name}1.service" if name.endswith("@") else f"civicmesh-{name}.service"
    local = tmp_path / file_name
    local.write_text(text.replace("/opt/civicmesh/venv/bin/civicmesh", CLI))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(local)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    problems = [ln for ln in proc.stderr.splitlines() if "civicmesh-central.target" not in ln]
    assert proc.returncode == 0 and not problems, proc.stderr


class Processes:
    """What the test started, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.files: list[IO[bytes]] = []
        self.sockets: dict[str, socket.socket] = {}
        self.said: dict[str, set[str]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self.files.append(log)
        # systemd's side of Type=notify and WatchdogSec: a datagram socket per service
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.logs / f"{name}.notify"))
        sock.setblocking(False)
        os.chmod(self.logs / f"{name}.notify", 0o666)  # the broker sends as mosquitto
        self.sockets[name] = sock
        env = env | {"NOTIFY_SOCKET": str(self.logs / f"{name}.notify"), "WATCHDOG_USEC": "4000000"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.running.append((name, proc))
        return proc

    def drain(self) -> None:
        """Read the notify sockets as systemd does: a full socket drops notifications."""
        for name, sock in self.sockets.items():
            while True:
                try:
                    self.said.setdefault(name, set()).add(sock.recv(4096).decode())
                except BlockingIOError:
                    break

    def notified(self, name: str) -> set[str]:
        """What the service told systemd so far (READY=1, WATCHDOG=1, ...)."""
        self.drain()
        return self.said.get(name, set())

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self) -> None:
        for name, proc in self.running:
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"

    def tails(self, lines: int = 40) -> str:
        """The last lines of every process's log, for a failure message."""
        parts = []
        for name, _ in self.running:
            tail = self.log(name).splitlines()[-lines:]
            parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> dict[str, int]:
        # In reverse order, each up to 20 s, all within 60 s: 30 s per process could
        # outlast the test's timeout and leave the next test to find the open files.
        deadline = time.monotonic() + 60
        codes = {}
        for name, proc in reversed(self.running):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=max(0.1, min(20.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        for file in self.files:
            file.close()
        for sock in self.sockets.values():
            sock.close()
        return codes


@pytest.fixture
def base() -> Iterator[Path]:
    # The broker drops root for the mosquitto user: its files must be reachable by it.
    folder = Path(tempfile.mkdtemp(prefix="civicmesh-site-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip
    return proc


def wait_until(what: str, check, timeout: float, procs: Processes) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        procs.alive()
        procs.drain()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{procs.tails()}")
        time.sleep(0.5)


def test_production_sequence_central_gateway_two_edges_over_tls(base: Path) -> None:
    mqtt_port, api_port = free_port(), free_port()
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "")
    site = base / "site"
    # 1. the central server
    made = run("setup", "central", "--dir", site, "--state-dir", base / "state",
               "--broker-state-dir", base / "broker", "--host", "127.0.0.1",
               "--mqtt-port", mqtt_port, "--api-port", api_port, "--api-host", "127.0.0.1",
               "--llm-backend", "none", "--user", user)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    procs = Processes(base)
    clients: list[httpx.Client] = []
    try:
        argv, env = exec_start("broker", base)
        broker = procs.start("broker", argv, env)
        assert wait_for_port(mqtt_port, 15), procs.log("broker")
        # 2. a gateway and two devices: setup on each, enrolment on the central
        gw = base / "gw"
        out = run("setup", "gateway", "--config", gw / "gateway.toml", "--state-dir", gw / "state",
                  "--pki-dir", gw / "pki", "--upstream", f"mqtts://127.0.0.1:{mqtt_port}",
                  "--user", user)  # fmt: skip
        assert out.returncode == 0, out.stderr
        request = next(gw.glob("enrol-*.json"))
        assert run("setup", "enrol", request, "--dir", site, "--out", gw / "pki").returncode == 0
        devices = []
        for n in (1, 2):
            dev = base / f"edge{n}"
            out = run("setup", "edge", "--config", dev / "edge.toml", "--state-dir", dev / "state",
                      "--pki-dir", dev / "pki", "--broker", f"mqtts://127.0.0.1:{mqtt_port}",
                      "--user", user)  # fmt: skip
            assert out.returncode == 0, out.stderr
            request = next(dev.glob("enrol-*.json"))
            enrolled = run("setup", "enrol", request, "--dir", site, "--zone", f"zone-{n}",
                           "--lat", "57.15", "--lon", "-2.1", "--out", dev / "pki")  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr
            devices.append((dev, request.stem.removeprefix("enrol-")))
            assert run("setup", "edge", "--check", "--config", dev / "edge.toml",
                       "--user", user).returncode == 0  # fmt: skip
        shutil.copy(site / "registry.json", gw / "registry.json")  # the gateway's copy
        assert run("setup", "gateway", "--check", "--config", gw / "gateway.toml",
                   "--user", user).returncode == 0  # fmt: skip
        broker.send_signal(signal.SIGHUP)  # the ACL now names the gateway
        check = run("setup", "central", "--check", "--dir", site, "--user", user)
        assert check.returncode == 0, check.stdout

        # 3. the central services, each its unit's ExecStart
        for name, instance in (("ingest@", "1"), ("ingest@", "2"), ("api", ""), ("reports", ""),
                               ("upkeep", "")):  # fmt: skip
            argv, env = exec_start(name, base, instance)
            procs.start(f"{name}{instance}", argv, env)
        assert wait_for_port(api_port, 60), procs.log("api")
        argv, env = exec_start("gateway", base)
        argv[argv.index("--config") + 1] = str(gw / "gateway.toml")
        procs.start("gateway", argv, env)
        for dev, device_id in devices:
            argv, env = exec_start("edge", base)
            argv[argv.index("--config") + 1] = str(dev / "edge.toml")
            env |= {"CIVICMESH_EDGE_WINDOW_S": "1", "CIVICMESH_EDGE_PUBLISH_INTERVAL_S": "1"}
            procs.start(f"edge-{device_id}", argv, env)

        # 4. batches end to end, read over HTTPS with the admin token
        ca = ssl.create_default_context(cafile=str(site / "pki" / "ca.crt"))
        token = (site / "secrets" / "api-admin.token").read_text().strip()
        api = httpx.Client(base_url=f"https://127.0.0.1:{api_port}", verify=ca, timeout=10,
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        clients.append(api)
        ids = {d for _, d in devices}

        def both_stored() -> bool:
            rows = api.get("/api/v1/devices").json()
            return {r["device_id"] for r in rows if r["batches"] > 0} >= ids

        wait_until("batches of both devices", both_stored, 120, procs)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ConnectError)):  # no plain HTTP
            httpx.get(f"http://127.0.0.1:{api_port}/api/v1/health", timeout=5)

        # 5. the dashboard signs in over HTTPS with the admin setup made
        password = (site / "secrets" / "dashboard-admin.password").read_text().strip()
        dash = httpx.Client(base_url=f"https://127.0.0.1:{api_port}", verify=ca, timeout=10)
        clients.append(dash)
        signed = dash.post("/dashboard/auth/login", json={"username": "admin",
                                                           "password": password})  # fmt: skip
        assert signed.status_code == 200, signed.text
        assert "secure" in signed.headers["set-cookie"].lower()
        me = dash.get("/dashboard/api/me")
        assert me.status_code == 200 and me.json()["user"] == "admin", me.text
        zones = {z["zone"] for z in api.get("/api/v1/zones").json()}
        assert {"zone-1", "zone-2"} <= zones
        procs.alive()
        # every Type=notify unit said READY, and the civicmesh ones feed the watchdog
        time.sleep(2.5)
        for name, _ in procs.running:
            said = procs.notified(name)
            assert "READY=1" in said, (name, said)
            assert name == "broker" or "WATCHDOG=1" in said, (name, said)
    finally:
        for client in clients:
            client.close()
        codes = procs.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM)}
    assert not bad, {k: procs.log(k)[-2000:] for k in bad}
