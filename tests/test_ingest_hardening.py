# ruff: noqa: F811  (the fixtures of test_ingest are imported and used as arguments)
"""Ingest against what the field sends it: poison records, bad health, database outages
longer than a keepalive, a doubled worker id, a dead worker thread (issue 16, 20).

Real broker (the test run's Mosquitto), real stores (SQLite in ``tmp_path``, a throw-away
PostgreSQL database).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from test_ingest import (  # noqa: F401  (fixtures)
    Fleet,
    Harness,
    fleet,
    harness,
    publisher,
    sqlite_store,
    sqlite_url,
    store,
    store_url,
    wait_for,
)

from analytics.ingest import IngestError, IngestWorker
from analytics.ingest.errors import is_permanent
from analytics.ingest.receive import Inbound, Kind
from analytics.ingest.verify import Verifier
from analytics.ingest.write import GroupWriter
from analytics.store import open_store
from analytics.store.base import Store, StoreError, WriteOutcome
from civicmesh import topics
from civicmesh.mqtt import Message, MqttLink
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import Registry, RegistryFile
from civicmesh.timeutil import now_ms


def _record(fleet: Fleet, **changes: object) -> QuarantineRecord:
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
    fields = {**json.loads(record.to_json()), **changes}
    return QuarantineRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def pg_store(pg_database: str) -> Iterator[Store]:
    store = open_store(pg_database)
    store.migrate()
    yield store
    store.close()


# ------------------------------------------------------------- item 3: health


@pytest.mark.integration
def test_a_health_report_with_a_huge_time_is_dropped_and_ingest_goes_on(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    """Issue 16 item 3: ``time_ms`` 10**15 used to kill the worker thread."""
    worker = harness.worker(sqlite_store)
    device = fleet.devices[0]
    report = {
        "device_id": device.key_id,
        "gateway_id": fleet.gateway.key_id,
        "received_at_ms": now_ms(),
        "reported_ms": 10**15,
        "outbox_batches": 0,
        "outbox_readings": 0,
        "model_version": "m1",
        "agent_version": "1",
    }
    health_topic = topics.gateway_health(fleet.gateway.key_id)
    publisher.publish(health_topic, json.dumps(report).encode(), qos=0)
    huge_count = {**report, "reported_ms": now_ms(), "outbox_batches": 2**40}
    publisher.publish(health_topic, json.dumps(huge_count).encode(), qos=0)
    wait_for(lambda: worker.stats()["health_dropped"] >= 2, what="both reports dropped")
    good = {**report, "reported_ms": now_ms()}
    publisher.publish(health_topic, json.dumps(good).encode(), qos=0)
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
    wait_for(lambda: sqlite_store.counts().batches == 1, what="the batch after the reports")
    wait_for(lambda: len(sqlite_store.device_health()) == 1, what="the good report stored")
    assert worker.running


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_restarts_a_worker_thread_that_ended(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    worker = harness.worker(sqlite_store)
    original = worker._cycle
    calls = {"n": 0}

    def dies_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit("a thread-ending failure outside any message")
        original()

    worker._cycle = dies_once  # type: ignore[method-assign]
    wait_for(lambda: worker.stats()["restarts"] == 1, what="the thread restarted")
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(fleet.devices[0])))
    wait_for(lambda: sqlite_store.counts().batches == 1, what="a batch after the restart")
    assert worker.running


# ------------------------------------------------- items 2 and 5: records


@pytest.mark.integration
def test_a_poison_quarantine_record_is_quarantined_and_what_follows_lands(
    fleet: Fleet, harness: Harness, pg_store: Store, publisher: MqttLink
) -> None:
    """Issue 16 item 2: payload_size 2**31 used to be retried forever (integer out of
    range), stalling every message behind it."""
    worker = harness.worker(pg_store)
    topic = topics.quarantine("gw", fleet.gateway.key_id)
    poison = _record(fleet, payload_size=2**31)
    publisher.publish(topic, poison.to_json())  # unsigned, as gateways sent them before
    publisher.publish(topic, poison.to_wire(fleet.gateway))  # signed, out of range
    publisher.publish(topic, _record(fleet, detail="lone \udc80 surrogate").to_wire(fleet.gateway))
    good = _record(fleet)
    publisher.publish(topic, good.to_wire(fleet.gateway))
    publisher.publish(fleet.topic, fleet.envelope(fleet.seal(fleet.devices[0])))
    wait_for(lambda: pg_store.counts().batches == 1, what="the batch behind the poison")

    wanted = (topic, topics.device_up(fleet.devices[0].key_id))

    def reasons() -> list[str]:
        return sorted(r.reason for r in pg_store.quarantined(1000) if r.topic in wanted)

    wait_for(lambda: len(reasons()) == 4, what="four records kept")
    assert reasons() == [
        "chain.gap",
        "quarantine.malformed",
        "quarantine.malformed",
        "quarantine.unsigned",
    ]
    kept = [r for r in pg_store.quarantined(1000) if r.topic in wanted]
    assert [r for r in kept if r.reason == "chain.gap"] == [good]
    # what was refused names nobody: it cannot frame a device
    assert all(r.device_id is None for r in kept if r.reason.startswith("quarantine."))
    assert worker.stats()["store_ok"] is True


@pytest.mark.integration
def test_forged_and_misattributed_records_frame_nobody(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    harness.worker(sqlite_store)
    topic = topics.quarantine("gw", fleet.gateway.key_id)
    victim = fleet.devices[1].key_id
    forged = _record(fleet, device_id=victim).to_wire(fleet.rogue_gateway)
    publisher.publish(topic, forged)
    other_source = _record(fleet, source=f"gw:{fleet.rogue_gateway.key_id}")
    publisher.publish(topic, other_source.to_wire(fleet.rogue_gateway))
    rogue_topic = topics.quarantine("gw", fleet.rogue_gateway.key_id)
    rogue_record = _record(fleet, source=f"gw:{fleet.rogue_gateway.key_id}", device_id=victim)
    publisher.publish(rogue_topic, rogue_record.to_wire(fleet.rogue_gateway))
    signed = json.loads(_record(fleet).to_wire(fleet.gateway))
    signed["device_id"] = victim  # tampered after signing
    publisher.publish(topic, json.dumps(signed).encode())

    def kept() -> list[QuarantineRecord]:
        wanted = (topic, rogue_topic, topics.device_up(fleet.devices[0].key_id))
        return [r for r in sqlite_store.quarantined(1000) if r.topic in wanted]

    wait_for(lambda: len(kept()) == 4, what="four records kept")
    assert sorted(r.reason for r in kept()) == [
        "quarantine.forged",
        "quarantine.forged",
        "quarantine.source_mismatch",
        "quarantine.unknown_gateway",
    ]
    assert all(r.device_id is None for r in kept())
    assert victim not in sqlite_store.quarantine_reasons(0, now_ms() + 1)


@pytest.mark.integration
def test_the_writer_quarantines_what_the_database_refuses_and_writes_the_rest(
    fleet: Fleet, pg_store: Store
) -> None:
    """The boundary itself: records that bypassed every check reach PostgreSQL, which
    refuses them for good; each is replaced by a store.refused record, nothing retried."""
    failures: list[BaseException] = []
    verifier = Verifier("ingest:t", 300_000, now_ms)
    writer = GroupWriter(
        pg_store,
        threading.Event(),
        lambda exc, delay: failures.append(exc),
        lambda record, why: verifier.record(
            Inbound(Message(record.topic, b"", 1, 1, False), now_ms(), Kind.QUARANTINE),
            "store.refused",
            why,
        ),
    )
    pg_store.upsert_devices(Registry.load(fleet.registry_path).devices.values())
    registry = RegistryFile(fleet.registry_path).current()
    message = Message(fleet.topic, fleet.envelope(fleet.seal(fleet.devices[0])), 1, 1, False)
    entry, rejects = verifier.uplink(Inbound(message, now_ms(), Kind.UPLINK), registry, now_ms())
    assert entry is not None and not rejects
    good = _record(fleet)
    records = [good, _record(fleet, payload_size=2**31), _record(fleet, detail="nul \x00 here")]
    result = writer.write([entry], records)
    assert result is not None and not failures, "a data error is not retried"
    assert result.outcomes == [WriteOutcome.INSERTED]
    assert [r.reason for r in result.records] == ["chain.gap", "store.refused", "store.refused"]
    assert "out of range" in result.records[1].detail
    assert pg_store.counts().batches == 1


@pytest.mark.integration
def test_store_errors_are_told_apart_at_the_boundary(pg_database: str) -> None:
    store = open_store(pg_database)
    store.migrate()
    try:
        store.add_quarantine([_record_plain(payload_size=2**31)])
    except StoreError as exc:
        assert is_permanent(exc)
    else:
        pytest.fail("PostgreSQL took payload_size 2**31")
    name = urlsplit(pg_database).path.lstrip("/")
    admin = pg_database.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        store.add_quarantine([_record_plain()])
    except StoreError as exc:
        assert not is_permanent(exc), "a lost connection is transient"
    store.close()


def _record_plain(**changes: object) -> QuarantineRecord:
    record = QuarantineRecord.of(
        reason="x.y", detail="d", source="s", topic="t", received_at_ms=now_ms(), payload=b""
    )
    return QuarantineRecord(**{**json.loads(record.to_json()), **changes})  # type: ignore[arg-type]


# ----------------------------------------- item 11: outage longer than keepalive


@pytest.mark.integration
@pytest.mark.slow
def test_a_database_outage_longer_than_the_keepalive_keeps_the_connection(
    fleet: Fleet,
    harness: Harness,
    pg_database: str,
    publisher: MqttLink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 16 item 11: the worker used to block paho's thread when its queue was full,
    so no keepalive went out and the broker dropped the connection (~45 s with the
    default keepalive; 3 s here, against an outage of 12 s)."""
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
    client_id = f"test-ingest-{secrets.token_hex(4)}"
    harness.client_ids.add(client_id)
    link = MqttLink(harness.url, client_id, persistent=True, manual_ack=True, keepalive=3)
    link.connect()
    worker = IngestWorker(
        harness.settings(queue_max_messages=3, max_batch_messages=2),
        store,
        RegistryFile(fleet.registry_path),
        link,
        "t",
    )
    worker.start()
    harness.workers.append((worker, link))
    harness.wait_subscribed(worker, client_id)
    device = fleet.devices[0]
    caplog.set_level(logging.WARNING, logger="civicmesh.mqtt")
    try:
        database_down(True)
        for _ in range(30):
            publisher.publish(fleet.topic, fleet.envelope(fleet.seal(device)))
        wait_for(lambda: worker.stats()["store_errors"] >= 1, what="the outage noticed")
        time.sleep(12)
        assert link.is_connected
    finally:
        database_down(False)
    check = open_store(pg_database)
    wait_for(lambda: check.counts().batches == 30, timeout=40, what="recovery")
    assert [e.seq for e in check.ledger(device.key_id)] == list(range(1, 31))
    # A blocked network thread notices the dropped connection only once it runs again.
    lost = [r for r in caplog.records if r.name == "civicmesh.mqtt" and "lost" in r.message]
    assert not lost, "the broker dropped the worker's connection during the outage"
    assert link.connections == 1, "one connection throughout"
    check.close()
    harness.close()
    store.close()


@pytest.mark.integration
def test_an_ack_is_never_sent_on_a_later_connection(system_mqtt_url: str) -> None:
    topic = f"civicmesh/v1/test/{secrets.token_hex(4)}"
    client_id = f"test-ack-{secrets.token_hex(4)}"
    got: list[Message] = []
    link = MqttLink(system_mqtt_url, client_id, persistent=True, manual_ack=True)
    link.subscribe(topic, got.append)
    link.connect()
    try:
        with MqttLink(system_mqtt_url, f"{client_id}-pub") as pub:
            pub.publish(topic, b"one")
        wait_for(lambda: len(got) == 1, what="the message")
        first = got[0]
        sock = link._client.socket() if link._client else None  # drop the connection
        assert sock is not None
        sock.shutdown(2)
        wait_for(lambda: link.connections == 2 and link.is_connected, what="reconnected")
        wait_for(lambda: len(got) == 2, what="the redelivery on the new connection")
        assert not link.ack(first), "the old packet id is not acknowledged"
        assert link.ack(got[1])
    finally:
        link.close()
        with MqttLink(system_mqtt_url, client_id):
            pass  # end the persistent session


# ------------------------------------------------- issue 20: doubled worker id


@pytest.mark.integration
def test_a_second_worker_with_the_same_id_is_refused_at_start(
    fleet: Fleet, harness: Harness, sqlite_store: Store, tmp_path: object
) -> None:
    client_id = f"test-ingest-{secrets.token_hex(4)}"
    harness.worker(sqlite_store, client_id=client_id, connect_first=False)
    twin_link = MqttLink(harness.url, client_id, persistent=True, manual_ack=True)
    twin = IngestWorker(
        harness.settings(), sqlite_store, RegistryFile(fleet.registry_path), twin_link, "t"
    )
    with pytest.raises(IngestError, match="another ingest worker with worker_id 't'"):
        twin.start()
    assert not twin_link.is_connected, "the twin never took the session over"
    # after a clean stop the id is free again
    harness.close()
    again_link = MqttLink(harness.url, client_id, persistent=True, manual_ack=True)
    again = IngestWorker(
        harness.settings(), sqlite_store, RegistryFile(fleet.registry_path), again_link, "t"
    )
    again.start()
    harness.workers.append((again, again_link))
    harness.client_ids.add(client_id)
    assert again.running


# ------------------------------------------------------ item 12: benign records


@pytest.mark.integration
def test_redeliveries_are_kept_but_do_not_count_against_the_device(
    fleet: Fleet, harness: Harness, sqlite_store: Store, publisher: MqttLink
) -> None:
    """Issue 16 item 12: a chain.replay (a redelivery) counted as a quarantined batch."""
    harness.worker(sqlite_store)
    device = fleet.devices[0]
    envelope = fleet.envelope(fleet.seal(device))
    publisher.publish(fleet.topic, envelope)
    publisher.publish(fleet.topic, envelope)
    wait_for(
        lambda: any(r.reason == "chain.replay" for r in sqlite_store.quarantined()),
        what="the replay recorded",
    )
    window = (0, now_ms() + 60_000)
    assert device.key_id not in sqlite_store.quarantine_counts(*window)
    assert device.key_id not in sqlite_store.quarantine_reasons(*window)


@pytest.mark.integration
def test_reports_do_not_count_records_anyone_could_have_put_a_device_name_on(
    fleet: Fleet, store: Store
) -> None:
    """A copy of a device's bytes, bit-flipped (signature.invalid, id peeked from the
    message) or re-sent on another topic (topic.device_mismatch), names the device; the
    reports' count of devices with quarantined batches must not count it as the device's."""
    device = fleet.devices[0].key_id
    store.upsert_devices(Registry.load(fleet.registry_path).devices.values())

    def record(reason: str) -> QuarantineRecord:
        return QuarantineRecord.of(
            reason=reason, detail="d", source=f"gw:{fleet.gateway.key_id}",
            topic=topics.device_up(device), received_at_ms=now_ms(), payload=b"x",
            device_id=device, seq=3,
        )  # fmt: skip

    store.add_quarantine([record("signature.invalid"), record("topic.device_mismatch")])
    window = (0, now_ms() + 60_000)
    assert device not in store.quarantine_counts(*window)
    store.add_quarantine([record("chain.fork")])  # the device's own signed fork counts
    assert store.quarantine_counts(*window) == {device: 1}
