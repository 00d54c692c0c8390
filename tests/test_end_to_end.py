"""End to end: simulator -> edge -> gateway -> broker -> ingest (own process) -> store.

Runs on two stacks: a private Mosquitto with PostgreSQL, and the embedded broker (amqtt,
which keeps nothing over a restart) with the embedded SQLite store. Mid-stream the
broker is restarted and the ingest process is killed with SIGKILL and started again.
Afterwards the store must hold exactly the readings the simulator produced (count and
values), every stored batch's device and gateway signatures must verify, the hash chain
must be intact, and no (device, seq) may be stored twice.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from analytics.store import open_store
from analytics.store.base import Resolution, SeriesPoint
from civicmesh.config import load_settings
from civicmesh.drivers import load_driver
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import GENESIS_HASH, open_batch, open_envelope
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from edge.agent import EdgeAgent, SystemClock
from edge.settings import EdgeSettings
from edge.windowing import Windower
from firmware_sim.city import SimulatedCity
from gateway.relay import Gateway
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOUR_MS = 3600 * 1000
SPAN_HOURS = 12
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z: fixed, so expected readings are exact
RESEND_AFTER_S = 3.0  # short, so what a restart lost is sent again within the test


def signer_for(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"e2e/{name}".encode()).digest())


@dataclass
class Stack:
    mqtt_url: str
    database_url: str
    restart_broker: Any  # () -> None


class IngestProcess:
    """``civicmesh ingest run`` in its own process, so it can be SIGKILLed."""

    def __init__(self, stack: Stack, registry: Path, log_path: Path) -> None:
        self.env = {
            **os.environ,
            "CIVICMESH_DATABASE_URL": stack.database_url,
            "CIVICMESH_REGISTRY_FILE": str(registry),
            "CIVICMESH_MQTT__URL": stack.mqtt_url,
            # The span lies in January 2026: keep it past the default retention windows.
            "CIVICMESH_STORAGE__RAW_RETENTION_DAYS": "36500",
            "CIVICMESH_STORAGE__ROLLUP_1M_RETENTION_DAYS": "36500",
            "CIVICMESH_STORAGE__ROLLUP_1H_RETENTION_DAYS": "36500",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it is subscribed (a first start has no session yet)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "civicmesh.cli",
                    "-v",
                    "ingest",
                    "run",
                    "--worker-id",
                    "e2e",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while b"subscribed to" not in self.log_path.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ingest did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(params=["mosquitto-postgresql", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    if request.param == "mosquitto-postgresql":
        broker = request.getfixturevalue("mosquitto")
        yield Stack(broker.url, request.getfixturevalue("pg_database"), broker.restart)
    else:
        from analytics.broker import EmbeddedBroker

        broker = EmbeddedBroker(host="127.0.0.1", port=0)
        broker.start()

        def restart() -> None:
            broker.stop()
            broker.start()

        # amqtt keeps session queues in memory only: a restart loses what it acknowledged
        # but had not delivered, and after a SIGKILL it does not reliably redeliver a
        # subscriber's unacknowledged messages. Receipts (ingest -> gateway -> edge) and
        # re-sending what has none are what make this stack lose nothing.
        try:
            yield Stack(broker.url, f"sqlite:///{tmp_path / 'store.db'}", restart)
        finally:
            broker.stop()


def same_points(a: list[SeriesPoint], b: list[SeriesPoint]) -> bool:
    """Equal buckets, counts, minima and maxima; means equal up to float summation order."""
    return len(a) == len(b) and all(
        (x.bucket_ms, x.count, x.min, x.max) == (y.bucket_ms, y.count, y.min, y.max)
        and math.isclose(x.mean, y.mean, rel_tol=1e-12)
        for x, y in zip(a, b, strict=True)
    )


def expected_readings(options: dict[str, Any], window_ms: int) -> dict[tuple[int, str], float]:
    """What the simulator produces over the span, windowed in one go."""
    driver = load_driver("sim", options)
    windower = Windower(window_ms, window_ms // driver.sample_interval_ms)
    end = START_MS + SPAN_HOURS * HOUR_MS
    readings = windower.feed(driver.read(end), end)
    return {(r.ts_ms, r.metric): r.value for r in readings}


def test_pipeline_end_to_end_with_restarts(stack: Stack, tmp_path: Path) -> None:
    city = SimulatedCity.generate(11, devices=4, zones=2)
    gateway_signer = signer_for("gateway")
    registry = Registry.empty().with_gateway(
        GatewayRecord(gateway_signer.key_id, gateway_signer.verify_key().to_text())
    )
    signers = {}
    for device in city.devices:
        signer = signers[device.name] = signer_for(device.name)
        registry = registry.with_device(
            DeviceRecord(
                signer.key_id, signer.verify_key().to_text(), device.zone, device.lat, device.lon
            )
        )
    registry_path = tmp_path / "registry.json"
    registry.save(registry_path)

    store = open_store(stack.database_url)
    store.migrate()

    ingest = IngestProcess(stack, registry_path, tmp_path / "ingest.log")
    ingest.start()
    links: list[MqttLink] = []
    gateway = None
    try:
        gw_settings = load_settings(
            GatewaySettings,
            None,
            {
                "key_file": str(tmp_path / "gw.key"),
                "registry_file": str(registry_path),
                "state_dir": str(tmp_path / "gw"),
                "device_mqtt": {"url": stack.mqtt_url},
                "upstream_mqtt": {"url": stack.mqtt_url},
                "resend_after_s": RESEND_AFTER_S,
            },
        )
        gw_dev = MqttLink(stack.mqtt_url, "e2e-gw-dev", persistent=True, manual_ack=True)
        gw_up = MqttLink(stack.mqtt_url, "e2e-gw-up")
        edge_link = MqttLink(stack.mqtt_url, "e2e-edge")
        links = [gw_dev, gw_up, edge_link]
        for link in links:
            link.connect()
        gateway = Gateway(gw_settings, gateway_signer, RegistryFile(registry_path), gw_dev, gw_up)
        gateway.start()

        agents = {}
        expected: dict[str, dict[tuple[int, str], float]] = {}
        for device in city.devices:
            options = dict(device.driver_options, start_ms=START_MS)
            settings = load_settings(
                EdgeSettings,
                None,
                {
                    "key_file": str(tmp_path / f"{device.name}.key"),
                    "state_dir": str(tmp_path / "edge" / device.name),
                    "mqtt": {"url": stack.mqtt_url},
                    "driver": {"name": "sim", "options": options},
                    "batch_max_readings": 120,
                    "resend_after_s": RESEND_AFTER_S,
                },
            )
            signer = signers[device.name]
            agents[signer.key_id] = EdgeAgent(
                settings, signer, load_driver("sim", options), edge_link, SystemClock()
            )
            expected[signer.key_id] = expected_readings(options, settings.window_s * 1000)

        # Stream the span hour by hour; disturb the pipeline a third and two thirds in.
        for hour in range(1, SPAN_HOURS + 1):
            now = START_MS + hour * HOUR_MS
            for agent in agents.values():
                agent.collect(now)
                agent.seal_all()
                agent.flush(timeout=5)
            if hour == SPAN_HOURS // 3:
                stack.restart_broker()
            if hour == 2 * SPAN_HOURS // 3:
                ingest.kill()
                ingest.start()

        # Drain: keep flushing until every outbox is empty and the store caught up.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for agent in agents.values():
                agent.flush(timeout=5)
            backlog = sum(a.health()["outbox"]["sealed_batches"] for a in agents.values())
            stored = {s.device_id: s.last_seq or 0 for s in store.devices()}
            last = {dev: a.health()["outbox"]["last_seq"] for dev, a in agents.items()}
            settled = backlog == 0 and gateway.stats()["backlog"] == 0
            if settled and all(stored.get(dev, 0) >= seq for dev, seq in last.items()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"pipeline did not drain: backlog {backlog}, stored {stored}, sent {last}")

        keys = RegistryFile(registry_path)
        for device_id, want in expected.items():
            got = store.readings(device_id, START_MS, START_MS + SPAN_HOURS * HOUR_MS)
            got_map = {(r.ts_ms, r.metric): r.value for r in got}
            assert len(got) == len(got_map), "a reading is stored twice"
            assert got_map == want, f"stored readings of {device_id} differ from the simulator's"

            ledger = store.ledger(device_id, limit=100_000)
            seqs = [entry.seq for entry in ledger]
            assert seqs == list(range(1, len(seqs) + 1)), "ledger seqs not contiguous/unique"
            prev = GENESIS_HASH
            for entry in ledger:
                envelope = open_envelope(entry.gateway_message, keys.gateway_key)
                assert envelope.gateway_id == gateway_signer.key_id
                batch = open_batch(envelope.device_message, keys.device_key)
                assert batch.message == entry.device_message
                assert batch.hash == entry.payload_hash
                assert batch.payload.prev_hash == prev, "hash chain broken in the store"
                prev = batch.hash
            assert sum(entry.readings for entry in ledger) == len(want)

        # The ingest process (killed once on the way) kept the rollups current itself:
        # they converge to the raw aggregates for every device and for the whole city.
        end = START_MS + SPAN_HOURS * HOUR_MS
        scopes: list[dict[str, str]] = [{}, *({"device_id": d} for d in expected)]
        deadline = time.monotonic() + 30
        while True:
            stale = [
                (scope, resolution)
                for scope in scopes
                for resolution in (Resolution.MINUTE, Resolution.HOUR)
                if not same_points(
                    store.rollup_series("no2", START_MS, end, resolution, **scope),
                    store.series("no2", START_MS, end, resolution.seconds, **scope),
                )
            ]
            if not stale:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"rollups differ from raw aggregates: {stale[:3]}")
            time.sleep(0.5)
    finally:
        if gateway is not None:
            gateway.stop()
        for link in links:
            link.close()
        ingest.stop()
        store.close()
