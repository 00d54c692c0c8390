"""Ingest worker against a real broker and real stores: exactly once, quarantine, back-pressure.

Batches are really sealed and countersigned, published to the local Mosquitto
(127.0.0.1:1883) on this test's own gateway topic; each worker uses its own shared group
and client id, and its persistent session is removed afterwards. Stores: SQLite in
``tmp_path`` and a throw-away PostgreSQL database.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from analytics.cli import register as register_cli
from analytics.ingest import IngestWorker
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store, StoredBatch, StoreError, WriteOutcome
from civicmesh import topics
from civicmesh.cli import main as cli_main
from civicmesh.config import load_settings
from civicmesh.errors import ConfigError
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    Receipt,
    SignedBatch,
    decode_receipt,
    make_payload,
    message_digest,
    seal_batch,
    wrap_envelope,
)
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from civicmesh.timeutil import now_ms

MIN = 60_000


def signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"test_ingest/{name}".encode()).digest())


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Fleet:
    """A registered gateway and devices, sealing chained batches like real agents."""

    def __init__(self, registry_path: Path) -> None:
        self.gateway = signer("gateway")
        self.devices = [signer("device-a"), signer("device-b")]
        self.stranger = signer("unregistered-device")
        self.rogue_gateway = signer("unregistered-gateway")
        self.registry_path = registry_path
        registry = Registry.empty().with_gateway(
            GatewayRecord(self.gateway.key_id, self.gateway.verify_key().to_text())
        )
        for index, device in enumerate(self.devices):
            registry = registry.with_device(
                DeviceRecord(
                    device.key_id,
                    device.verify_key().to_text(),
                    zone="north" if index == 0 else "south",
                    lat=52.0 + index,
                    lon=13.0,
                    kind="air",
                )
            )
        registry.save(registry_path)
        self.heads: dict[str, tuple[int, bytes]] = {}
        self.t0 = (now_ms() // MIN) * MIN - 30 * MIN

    @property
    def topic(self) -> str:
        return topics.gateway_up(self.gateway.key_id)

    def readings(self, seq: int, values: Sequence[float] = (12.5, 30.25)) -> list[Reading]:
        ts = self.t0 + seq * MIN
        return [Reading(ts, "pm25", values[0], 0), Reading(ts, "temperature", values[1], 0)]

    def seal(self, device: Ed25519Signer, readings: Sequence[Reading] | None = None) -> SignedBatch:
        seq, prev = self.heads.get(device.key_id, (0, GENESIS_HASH))
        seq += 1
        rows = self.readings(seq) if readings is None else readings
        payload = make_payload(device.key_id, seq, prev, self.t0 + seq * MIN + 500, rows, "m1")
        batch = seal_batch(device, payload)
        self.heads[device.key_id] = (seq, batch.hash)
        return batch

    def envelope(self, batch: SignedBatch, gateway: Ed25519Signer | None = None) -> bytes:
        return wrap_envelope(gateway or self.gateway, batch.message, now_ms()).message


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "registry.json")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.integration),
        pytest.param("timescaledb", marks=[pytest.mark.integration, pytest.mark.timescaledb]),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    # A database on the plain server, or on the TimescaleDB test server (auto takes it).
    url: str = request.getfixturevalue(
        "tsdb_database" if request.param == "timescaledb" else "pg_database"
    )
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def publisher(system_mqtt_url: str) -> Iterator[MqttLink]:
    link = MqttLink(system_mqtt_url, f"test-ingest-pub-{secrets.token_hex(4)}")
    link.connect()
    yield link
    link.close()


class Harness:
    """Makes workers on the system broker with private groups; removes their sessions."""

    def __init__(self, url: str, fleet: Fleet) -> None:
        self.url = url
        self.fleet = fleet
        self.group = f"test-{secrets.token_hex(4)}"
        self.workers: list[tuple[IngestWorker, MqttLink]] = []
        self.client_ids: set[str] = set()

    def settings(self, **ingest: Any) -> AnalyticsSettings:
        return load_settings(
            AnalyticsSettings,
            None,
            {
                "registry_file": str(self.fleet.registry_path),
                "mqtt": {"url": self.url},
                "ingest": {"shared_group": self.group, "max_batch_delay_ms": 50, **ingest},
            },
        )

    def worker(
        self,
        store: Store,
        *,
        client_id: str | None = None,
        connect_first: bool = True,
        **ingest: Any,
    ) -> IngestWorker:
        client_id = client_id or f"test-ingest-{secrets.token_hex(4)}"
        self.client_ids.add(client_id)
        link = MqttLink(self.url, client_id, persistent=True, manual_ack=True)
        if connect_first:
            link.connect()
        worker = IngestWorker(
            self.settings(**ingest), store, RegistryFile(self.fleet.registry_path), link, "t"
        )
        worker.start()
        self.workers.append((worker, link))
        self.wait_subscribed(worker, client_id)
        return worker

    def wait_subscribed(self, worker: IngestWorker, client_id: str) -> None:
        """Publish probes until one arrives: SUBSCRIBE is asynchronous, and a batch published
        before the broker applied it would never reach this worker."""
        probe_topic = topics.quarantine("probe", client_id)
        with MqttLink(self.url, f"{client_id}-probe") as probe:
            deadline = time.monotonic() + 10
            while worker.stats()["acked"] == 0:
                if time.monotonic() > deadline:
                    pytest.fail("the ingest worker's subscriptions never became active")
                probe.publish(probe_topic, b"probe")
                wait_until = time.monotonic() + 0.3
                while worker.stats()["acked"] == 0 and time.monotonic() < wait_until:
                    time.sleep(0.01)

    def stop(self, worker: IngestWorker) -> None:
        for entry in list(self.workers):
            if entry[0] is worker:
                worker.stop()
                entry[1].close()
                self.workers.remove(entry)

    def close(self) -> None:
        """Stop the workers and end their sessions (idempotent)."""
        workers, self.workers = self.workers, []
        for worker, link in workers:
            worker.stop()
            link.close()
        # A clean, non-persistent connection with the same id ends each stored session,
        # so the shared broker does not keep queueing for workers that are gone.
        client_ids, self.client_ids = self.client_ids, set()
        for client_id in client_ids:
            with MqttLink(self.url, client_id):
                pass


@pytest.fixture
def harness(system_mqtt_url: str, fleet: Fleet) -> Iterator[Harness]:
    h = Harness(system_mqtt_url, fleet)
    yield h
    h.close()


def _opened(url: str, harness: Harness) -> Iterator[Store]:
    store = open_store(url)
    store.migrate()
    yield store
    harness.close()  # workers stop before their store closes under them
    store.close()


@pytest.fixture
def store(store_url: str, harness: Harness) -> Iterator[Store]:
    yield from _opened(store_url, harness)


@pytest.fixture
def sqlite_store(sqlite_url: str, harness: Harness) -> Iterator[Store]:
    yield from _opened(sqlite_url, harness)


def mine(
    records: Iterable[QuarantineRecord], fleet: Fleet, *extra_topics: str
) -> list[QuarantineRecord]:
    """Quarantine records caused by this test (the shared broker carries others' traffic)."""
    wanted = {fleet.topic, *extra_topics}
    return [r for r in records if r.topic in wanted]


def stored_values(
    store: Store, device: Ed25519Signer, fleet: Fleet
) -> list[tuple[int, str, float]]:
    rows = store.readings(device.key_id, fleet.t0, fleet.t0 + 24 * 3600 * 1000)
    return [(r.ts_ms, r.metric, r.value) for r in rows]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_environment_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(AnalyticsSettings)
    assert settings.database_url == "sqlite:///var/civicmesh.db"
    assert settings.ingest.max_batch_messages == 100
    assert settings.ingest.max_batch_delay_ms == 200
    assert settings.ingest.shared_group == "civicmesh-ingest"
    assert (settings.api.host, settings.api.port) == ("127.0.0.1", 8080)
    assert settings.mqtt_client_id("w1") == "civicmesh-ingest-w1"

    monkeypatch.setenv("CIVICMESH_INGEST__MAX_BATCH_MESSAGES", "17")
    monkeypatch.setenv("CIVICMESH_MQTT__PROTOCOL", "3.1.1")
    settings = load_settings(AnalyticsSettings, None, {"api": {"port": 9000}})
    assert settings.ingest.max_batch_messages == 17
    assert settings.mqtt.protocol == "3.1.1"
    assert settings.api.port == 9000

    with pytest.raises(ConfigError, match=r"ingest\.max_batch_messages"):
        load_settings(AnalyticsSettings, None, {"ingest": {"max_batch_messages": 0}})
    with pytest.raises(ConfigError, match=r"unknown key 'api\.prot'"):
        load_settings(AnalyticsSettings, None, {"api": {"prot": 1}})
    with pytest.raises(ConfigError, match="database_url"):
        load_settings(AnalyticsSettings, None, {"database_url": "mysql://somewhere/db"})


def test_settings_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "analytics.toml"
    path.write_text(
        'database_url = "sqlite:///x.db"\n[ingest]\nmax_future_ms = 1000\n[api]\nport = 8181\n',
        encoding="utf-8",
    )
    settings = load_settings(AnalyticsSettings, path)
    assert settings.database_url == "sqlite:///x.db"
    assert settings.ingest.max_future_ms == 1000
    assert settings.api.port == 8181


def test_db_migrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli_main(["db", "migrate", "--database-url", url]) == 0
    assert "applied: 0001_initial" in capsys.readouterr().out
    assert cli_main(["db", "migrate", "--database-url", url]) == 0
    assert "up to date" in capsys.readouterr().out
    assert callable(register_cli)


# ------------------------------------------------------------------ exactly once


@pytest.mark.integration
def test_batches_stored_exactly_once_with_exact_values(
    fleet: Fleet, harness: Harness, store: Store, publisher: MqttLink
) -> None:
    worker = harness.worker(store)
    a, b = fleet.devices
    sent: dict[str, list[tuple[int, str, float]]] = {a.key_id: [], b.key_id: []}
    for _ in range(5):
        for device in (a, b):
            batch = fleet.seal(device)
            sent[device.key_id].extend((r.ts_ms, r.metric, r.value) for r in batch.payload.readings)
            publisher.publish(fleet.topic, fleet.envelope(batch))
    wait_for(lambda: store.counts().batches == 10, what="10 stored batches")

    for device in (a, b):
        assert stored_values(store, device, fleet) == sorted(sent[device.key_id])
        ledger = store.ledger(device.key_id)
        assert [e.seq for e in ledger] == [1, 2, 3, 4, 5]
        assert all(e.gateway_id == fleet.gateway.key_id for e in ledger)
    # Registry devices were synced into the store at start.
    statuses = {d.device_id: d for d in store.devices()}
    assert statuses[a.key_id].zone == "north" and statuses[a.key_id].last_seq == 5
    stats = worker.stats()
    assert stats["written_batches"] == 10
    assert stats["written_readings"] == 20
    assert stats["store_errors"] == 0
    assert stats["last_lag_ms"] is not None and stats["last_lag_ms"] >= 0
    wait_for(lambda: worker.stats()["acked"] >= 10, what="acknowledgements")
    assert not mine(store.quarantined(), fleet)


@pytest.mark.integration
def test_same_envelope_twice_is_stored_once_recorded_as_replay_and_receipted_twice(
    fleet: Fleet, harness: Harness, store: Store, publisher: MqttLink
) -> None:
    receipts: list[Receipt] = []
    publisher.subscribe(
        topics.gateway_receipt(fleet.gateway.key_id),
        lambda m: receipts.append(decode_receipt(m.payload)),
    )
    worker = harness.worker(store)
    device = fleet.devices[0]
    envelope = fleet.envelope(fleet.seal(device))
    publisher.publish(fleet.topic, envelope)
    wait_for(lambda: store.counts().batches == 1, what="the first copy stored")
    wait_for(lambda: len(receipts) == 1, what="the first receipt")
    publisher.publish(fleet.topic, envelope)
    wait_for(lambda: worker.stats()["duplicates"] == 1, what="the redelivery counted")
    wait_for(lambda: len(receipts) == 2, what="the second receipt")

    assert store.counts().batches == 1
    assert store.counts().readings == 2
    wait_for(lambda: len(mine(store.quarantined(), fleet)) == 1, what="the replay record")
    (record,) = mine(store.quarantined(), fleet)
    assert record.reason == "chain.replay"
    assert "a redelivery or a replay" in record.detail
    assert (record.device_id, record.seq) == (device.key_id, 1)
    assert record.payload() == envelope
    # Held either way, so the gateway gets its receipt both times.
    assert [r.digests for r in receipts] == [(message_digest(envelope),)] * 2
    assert receipts[0].issuer == "ingest:t"

    # Same (device, seq) with other content: a fork, and the stored batch stays.
    fleet.heads.pop(device.key_id)
    fork = fleet.seal(device, fleet.readings(1, values=(99.0, 1.0)))
    publisher.publish(fleet.topic, fleet.envelope(fork))
    wait_for(lambda: len(mine(store.quarantined(), fleet)) == 2, what="the fork record")
    fork_record = next(r for r in mine(store.quarantined(), fleet) if r.reason == "chain.fork")
    assert (fork_record.device_id, fork_record.seq) == (device.key_id, 1)
    assert fork_record.source == "ingest:t"
    assert [v for _, _, v in stored_values(store, device, fleet)] == [12.5, 30.25]


# ---------------------------------------------------------------------- quarantine


@pytest.mark.integration
def test_bad_messages_are_quarantined_and_ingest_keeps_going(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    store = sqlite_store
    worker = harness.worker(store)
    device = fleet.devices[0]
    rogue_topic = topics.gateway_up(fleet.rogue_gateway.key_id)

    good = fleet.envelope(fleet.seal(device))
    tampered = bytearray(fleet.envelope(fleet.seal(fleet.devices[1])))
    tampered[-1] ^= 0x01  # the last byte belongs to the gateway's signature
    stranger_batch = seal_batch(
        fleet.stranger,
        make_payload(fleet.stranger.key_id, 1, GENESIS_HASH, fleet.t0, fleet.readings(1)),
    )
    publisher.publish(fleet.topic, b"\x00garbage, not CBOR")
    publisher.publish(fleet.topic, bytes(tampered))
    publisher.publish(fleet.topic, fleet.envelope(stranger_batch))
    publisher.publish(
        rogue_topic, fleet.envelope(fleet.seal(fleet.devices[1]), fleet.rogue_gateway)
    )
    # A registered gateway's envelope on another gateway's topic.
    publisher.publish(rogue_topic, good)
    wait_for(
        lambda: len(mine(store.quarantined(), fleet, rogue_topic)) == 5, what="5 quarantine records"
    )
    reasons = sorted(r.reason for r in mine(store.quarantined(), fleet, rogue_topic))
    assert reasons == sorted(
        [
            "decode.malformed",
            "signature.invalid",
            "signature.unknown_signer",  # unknown device
            "signature.unknown_signer",  # unknown gateway
            "gateway.topic_mismatch",
        ]
    )
    unknown_device = [r for r in store.quarantined() if r.device_id == fleet.stranger.key_id]
    assert len(unknown_device) == 1 and "no key registered" in unknown_device[0].detail

    # Still running: the good batch (and a later one) is stored.
    publisher.publish(fleet.topic, good)
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
    wait_for(lambda: store.counts().batches == 2, what="the good batches")
    assert [e.seq for e in store.ledger(device.key_id)] == [1, 2]
    assert worker.running
    assert worker.stats()["quarantined_by_reason"]["signature.unknown_signer"] == 2


@pytest.mark.integration
def test_implausible_readings_are_quarantined_and_the_rest_stored(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    store = sqlite_store
    harness.worker(store, max_future_ms=60_000)
    device = fleet.devices[0]
    ts = fleet.t0 + MIN
    future = now_ms() + 3_600_000
    readings = [
        Reading(ts, "pm25", math.nan),
        Reading(ts, "pm10", 20.0),
        Reading(ts, "no2", -5.0),
        Reading(ts, "temperature", 21.5, raw=math.inf),
        Reading(future, "relativehumidity", 40.0),
        Reading(ts, "o3", 33.0),
    ]
    batch = fleet.seal(device, readings)
    publisher.publish(fleet.topic, fleet.envelope(batch))
    wait_for(lambda: store.counts().batches == 1, what="the batch")
    wait_for(lambda: len(mine(store.quarantined(), fleet)) == 4, what="4 reading records")

    assert stored_values(store, device, fleet) == [(ts, "pm10", 20.0), (ts, "o3", 33.0)]
    assert store.ledger(device.key_id)[0].readings == 2
    assert store.ledger(device.key_id)[0].payload_hash == batch.hash  # the whole batch is kept
    by_reason = sorted((r.reason, r.device_id, r.seq) for r in mine(store.quarantined(), fleet))
    assert by_reason == [
        ("reading.future", device.key_id, 1),
        ("reading.non_finite", device.key_id, 1),
        ("reading.non_finite", device.key_id, 1),
        ("reading.out_of_range", device.key_id, 1),
    ]
    out_of_range = next(r for r in store.quarantined() if r.reason == "reading.out_of_range")
    assert b'"metric":"no2"' in out_of_range.payload() and "-5.0" in out_of_range.detail


@pytest.mark.integration
def test_gateway_quarantine_records_are_stored_and_malformed_ones_too(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    store = sqlite_store
    harness.worker(store)
    topic = topics.quarantine("gw", fleet.gateway.key_id)
    record = QuarantineRecord.of(
        reason="chain.gap",
        detail="seq 7 after 5",
        source=f"gw:{fleet.gateway.key_id}",
        topic=topics.device_up(fleet.devices[0].key_id),
        received_at_ms=fleet.t0,
        payload=b"\x01\x02\x03",
        device_id=fleet.devices[0].key_id,
        seq=7,
    )
    publisher.publish(topic, record.to_wire(fleet.gateway))
    publisher.publish(topic, b'{"reason": 5}')
    bad_base64 = dict(json.loads(record.to_wire(fleet.gateway)), payload_b64="!!!")
    publisher.publish(topic, json.dumps(bad_base64).encode())
    device_topic = topics.device_up(fleet.devices[0].key_id)

    def kept() -> list[QuarantineRecord]:
        return [r for r in store.quarantined() if r.topic in (topic, device_topic)]

    wait_for(lambda: len(kept()) == 3, what="3 stored records")
    stored = {r.reason: r for r in kept()}
    assert stored["chain.gap"] == record
    # neither made it as the gateway's: one unsigned, one malformed; they name no device
    refused = [r for r in kept() if r.reason != "chain.gap"]
    assert sorted(r.reason for r in refused) == ["quarantine.malformed", "quarantine.unsigned"]
    assert {r.payload() for r in refused} >= {b'{"reason": 5}'}
    assert all(r.device_id is None for r in refused)


@pytest.mark.integration
def test_registry_changes_are_picked_up(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    store = sqlite_store
    harness.worker(store)
    newcomer = signer("newcomer")
    registry = Registry.load(fleet.registry_path).with_device(
        DeviceRecord(newcomer.key_id, newcomer.verify_key().to_text(), zone="east")
    )
    time.sleep(0.02)  # a new mtime even on coarse file systems
    registry.save(fleet.registry_path)
    wait_for(
        lambda: newcomer.key_id in {d.device_id for d in store.devices()},
        what="the new device synced into the store",
    )
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(newcomer)))
    wait_for(lambda: store.counts().batches == 1, what="the newcomer's batch")
    assert [e.seq for e in store.ledger(newcomer.key_id)] == [1]


# ------------------------------------------------------------ ack after commit


class FailingStore(Store):
    """Delegates to a real store, but ``write_batches`` raises StoreError ``failures`` times
    (the database is down); counts the calls."""

    def __init__(self, inner: Store, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.write_calls = 0
        self.backend = inner.backend

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteOutcome]:
        self.write_calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("connection refused (simulated database outage)")
        return self.inner.write_batches(batches)

    def migrate(self) -> list[str]:
        return self.inner.migrate()

    def close(self) -> None:
        self.inner.close()

    def add_quarantine(self, records: Sequence[QuarantineRecord]) -> None:
        self.inner.add_quarantine(records)

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> None:
        self.inner.upsert_devices(records)

    def devices(self) -> Any:
        return self.inner.devices()

    def zones(self) -> Any:
        return self.inner.zones()

    def latest(self, zone: str | None = None) -> Any:
        return self.inner.latest(zone)

    def series(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.series(*args, **kwargs)

    def readings(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.readings(*args, **kwargs)

    def ledger(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.ledger(*args, **kwargs)

    def quarantined(self, limit: int = 100) -> Any:
        return self.inner.quarantined(limit)

    def counts(self) -> Any:
        return self.inner.counts()

    def refresh_rollups(self) -> int:
        return self.inner.refresh_rollups()

    def rollup_series(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.rollup_series(*args, **kwargs)

    def zone_aggregates(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.zone_aggregates(*args, **kwargs)

    def completeness(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.completeness(*args, **kwargs)

    def apply_retention(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.apply_retention(*args, **kwargs)

    def ledger_span(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.ledger_span(*args, **kwargs)

    def flagged_readings(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.flagged_readings(*args, **kwargs)

    def quarantine_counts(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.quarantine_counts(*args, **kwargs)

    def save_report(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.save_report(*args, **kwargs)

    def reports(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.reports(*args, **kwargs)

    def zone_shapes(self) -> Any:
        return self.inner.zone_shapes()

    def save_zone_shape(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.save_zone_shape(*args, **kwargs)

    def device_health(self) -> Any:
        return self.inner.device_health()

    def save_device_health(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.save_device_health(*args, **kwargs)

    def model_versions(self) -> Any:
        return self.inner.model_versions()

    def quarantine_reasons(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.quarantine_reasons(*args, **kwargs)


@pytest.mark.integration
def test_store_outage_holds_acks_and_recovers_without_loss(
    fleet: Fleet, harness: Harness, store: Store, publisher: MqttLink
) -> None:
    flaky = FailingStore(store, failures=2)
    worker = harness.worker(flaky, max_batch_messages=50)
    probes = worker.stats()["acked"]
    device = fleet.devices[0]
    for _ in range(20):
        publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
    wait_for(lambda: worker.stats()["store_errors"] >= 1, what="a store error")
    stats = worker.stats()
    assert stats["acked"] == probes and stats["store_ok"] is False
    wait_for(lambda: store.counts().batches == 20, timeout=20, what="recovery")
    assert [e.seq for e in store.ledger(device.key_id)] == list(range(1, 21))
    assert store.counts().readings == 40
    # store_ok is set just after the commit that the counts above already see
    wait_for(lambda: worker.stats()["store_ok"] is True, what="store_ok after recovery")
    assert worker.stats()["store_errors"] == 2
    wait_for(lambda: worker.stats()["acked"] == probes + 20, what="all acknowledged")
    assert not mine(store.quarantined(), fleet), "no duplicates from the retries"


@pytest.mark.integration
def test_unacknowledged_messages_are_redelivered_to_the_restarted_worker(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    store = sqlite_store
    down = FailingStore(store, failures=10**9)
    client_id = f"test-ingest-{secrets.token_hex(4)}"
    first = harness.worker(down, client_id=client_id)
    probes = first.stats()["acked"]
    device = fleet.devices[0]
    for _ in range(3):
        publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
    wait_for(lambda: first.stats()["received"] == probes + 3, what="3 received")
    wait_for(lambda: down.write_calls >= 1, what="a failed write")
    harness.stop(first)  # the database never came back: nothing may have been acknowledged
    assert first.stats()["acked"] == probes
    assert store.counts().batches == 0

    # While no worker runs, the broker keeps queueing for the persistent session.
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
    second = harness.worker(store, client_id=client_id, connect_first=False)
    wait_for(lambda: store.counts().batches == 4, what="redelivered batches stored")
    assert [e.seq for e in store.ledger(device.key_id)] == [1, 2, 3, 4]
    wait_for(lambda: second.stats()["acked"] >= 4, what="acknowledgements")


# ------------------------------------------------------------- other brokers, CLI


@pytest.mark.integration
def test_embedded_broker_uses_a_plain_subscription(
    fleet: Fleet, embedded_broker: Any, sqlite_url: str
) -> None:
    store = open_store(sqlite_url)
    store.migrate()
    link = MqttLink(embedded_broker.url, "test-embedded-ingest", persistent=True, manual_ack=True)
    settings = load_settings(
        AnalyticsSettings,
        None,
        {"mqtt": {"url": embedded_broker.url}, "ingest": {"max_batch_delay_ms": 20}},
    )
    worker = IngestWorker(settings, store, RegistryFile(fleet.registry_path), link, "emb")
    worker.start()  # connects by itself: the link was not connected
    publisher = MqttLink(embedded_broker.url, "test-embedded-pub")
    publisher.connect()
    try:
        assert link.protocol_version == 4
        for _ in range(3):
            publisher.publish(fleet.topic, fleet.envelope(fleet.seal(fleet.devices[1])))
        wait_for(lambda: store.counts().batches == 3, what="3 batches via amqtt")
        assert store.counts().quarantined == 0
    finally:
        publisher.close()
        worker.stop()
        link.close()
        store.close()


@pytest.mark.integration
def test_ingest_run_command_stores_and_stops_on_sigterm(
    fleet: Fleet, system_mqtt_url: str, tmp_path: Path, publisher: MqttLink
) -> None:
    url = f"sqlite:///{tmp_path / 'cli-store.db'}"
    worker_id = f"cli{secrets.token_hex(3)}"
    env = {
        **os.environ,
        "CIVICMESH_DATABASE_URL": url,
        "CIVICMESH_REGISTRY_FILE": str(fleet.registry_path),
        "CIVICMESH_MQTT__URL": system_mqtt_url,
        "CIVICMESH_INGEST__SHARED_GROUP": f"test-{worker_id}",
    }
    log_path = tmp_path / "ingest.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "civicmesh.cli",
                "-v",
                "ingest",
                "run",
                "--worker-id",
                worker_id,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: b"subscribed to" in log_path.read_bytes(), what="the worker to subscribe")
        store = open_store(url)
        try:
            # Probe until the subscriptions are active (SUBSCRIBE is asynchronous).
            deadline = time.monotonic() + 10
            while not store.counts().quarantined:
                assert time.monotonic() < deadline, "the CLI worker never received a probe"
                publisher.publish(topics.quarantine("probe", worker_id), b"probe")
                time.sleep(0.3)
            publisher.publish(fleet.topic, fleet.envelope(fleet.seal(fleet.devices[0])))
            wait_for(lambda: store.counts().batches == 1, what="the batch stored by the CLI worker")
        finally:
            store.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        with MqttLink(system_mqtt_url, f"civicmesh-ingest-{worker_id}"):
            pass  # end the persistent session the command left behind


@pytest.mark.integration
def test_real_postgres_outage_mid_stream_loses_nothing_and_resumes(
    fleet: Fleet, harness: Harness, pg_database: str, publisher: MqttLink
) -> None:
    """The database really goes away: new connections are refused and the worker's own
    connection is killed, while batches keep arriving. Nothing is acknowledged until the
    database is back; then everything is stored once."""
    from urllib.parse import urlsplit

    import psycopg

    name = urlsplit(pg_database).path.lstrip("/")
    admin_url = pg_database.rsplit("/", 1)[0] + "/postgres"

    def database_down(down: bool) -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not down).lower()}')
            if down:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    store = open_store(pg_database)
    store.migrate()
    worker = harness.worker(store, max_batch_messages=10)
    device = fleet.devices[0]
    try:
        for _ in range(5):
            publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
        wait_for(lambda: store.counts().batches == 5, what="the first batches")
        acked = worker.stats()["acked"]

        database_down(True)
        for _ in range(15):
            publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
        wait_for(lambda: worker.stats()["store_errors"] >= 1, what="the outage noticed")
        time.sleep(1.0)
        assert worker.stats()["acked"] == acked, "nothing acknowledged while the database is down"
        assert worker.stats()["store_ok"] is False
    finally:
        database_down(False)
    check = open_store(pg_database)  # this thread's old connection was killed too
    wait_for(lambda: check.counts().batches == 20, timeout=30, what="recovery")
    assert [e.seq for e in check.ledger(device.key_id)] == list(range(1, 21))
    assert check.counts().readings == 40
    wait_for(lambda: worker.stats()["acked"] == acked + 15, what="all acknowledged")
    assert worker.stats()["store_ok"] is True
    check.close()
    store.close()


@pytest.mark.integration
def test_readings_before_the_device_was_registered_are_quarantined(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    from dataclasses import replace

    device = fleet.devices[1]
    registered = fleet.t0 + 10 * MIN
    registry = RegistryFile(fleet.registry_path).current()
    registry.with_device(
        replace(registry.devices[device.key_id], registered_at_ms=registered)
    ).save(fleet.registry_path)
    harness.worker(sqlite_store)
    early, late = fleet.t0 + 5 * MIN, fleet.t0 + 20 * MIN
    batch = fleet.seal(device, [Reading(early, "pm25", 9.0), Reading(late, "pm25", 11.0)])
    publisher.publish(fleet.topic, fleet.envelope(batch))
    wait_for(lambda: sqlite_store.counts().batches == 1, what="the batch")
    wait_for(lambda: len(mine(sqlite_store.quarantined(), fleet)) == 1, what="the record")
    (record,) = mine(sqlite_store.quarantined(), fleet)
    assert record.reason == "reading.before_registration"
    assert "before the device was registered" in record.detail
    assert stored_values(sqlite_store, device, fleet) == [(late, "pm25", 11.0)]


@pytest.mark.integration
def test_a_batch_with_an_unknown_metric_is_quarantined_whole_and_kept(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    """A metric code this version does not know (newer firmware?) cannot be stored as a
    reading; the signed batch goes to quarantine whole, bytes kept for a later replay."""
    import cbor2

    from civicmesh import protocol

    harness.worker(sqlite_store)
    device = fleet.devices[0]
    body = {1: 1, 2: device.key_id, 3: 1, 4: GENESIS_HASH, 5: fleet.t0 + MIN,
            6: fleet.t0, 7: [[0, 1, 12.5, 0], [0, 99, 3.0, 0]], 8: ""}  # fmt: skip
    message, _ = protocol._cose_sign1(device, cbor2.dumps(body, canonical=True))
    envelope = wrap_envelope(fleet.gateway, message, now_ms()).message
    publisher.publish(fleet.topic, envelope)
    wait_for(lambda: len(mine(sqlite_store.quarantined(), fleet)) == 1, what="the record")
    (record,) = mine(sqlite_store.quarantined(), fleet)
    assert record.reason == "schema.unknown_metric"
    assert record.device_id == device.key_id
    assert record.payload() == envelope
    assert sqlite_store.counts().batches == 0
