"""Field-hard nodes (issue 16, node side): no single message, file or outage stops an
edge agent or a gateway.

Each test here failed on the code before its fix (the commit messages say which).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from civicmesh.errors import RegistryError
from civicmesh.identity import Ed25519Signer, VerifyKey
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import (
    GENESIS_HASH,
    ProtocolError,
    Reading,
    SchemaError,
    _cose_sign1,
    decode_payload,
    decode_receipt,
    make_payload,
    open_batch,
    seal_batch,
)
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from edge.agent import EdgeAgent
from edge.outbox import Outbox
from gateway.buffer import GatewayBuffer

T0 = 1_767_225_600_000
DAY_MS = 86_400_000


def signer(tag: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed((tag * 32)[:32].encode())


def raw_payload(device_id: str, rows: list[list[Any]], version: Any = 1) -> bytes:
    body = {
        1: version,
        2: device_id,
        3: 1,
        4: GENESIS_HASH,
        5: T0,
        6: T0,
        7: rows,
        8: "",
    }
    return cbor2.dumps(body, canonical=True)


def raw_batch(dev: Ed25519Signer, rows: list[list[Any]], version: Any = 1) -> bytes:
    message, _ = _cose_sign1(dev, raw_payload(dev.key_id, rows, version))
    return message


# ---------------------------------------------------------------- decoders (items 1, 15)


@pytest.mark.parametrize("value", [2**1100, -(2**1100), 2**64])
def test_a_bignum_value_is_a_schema_error_not_an_overflow(value: int) -> None:
    dev = signer("b")
    message = raw_batch(dev, [[0, 1, value, 0]])
    with pytest.raises(SchemaError, match="2\\*\\*53"):
        open_batch(message, {dev.key_id: dev.verify_key()}.get)
    for position in (4, 5):  # raw and anomaly columns
        row: list[Any] = [0, 1, 1.0, 0, None, None]
        row[position] = value
        with pytest.raises(ProtocolError):
            decode_payload(raw_payload(dev.key_id, [row]))


@pytest.mark.parametrize("version", [True, 1.0])
def test_protocol_version_must_be_exactly_the_integer_1(version: Any) -> None:
    dev = signer("v")
    with pytest.raises(SchemaError) as caught:
        decode_payload(raw_payload(dev.key_id, [[0, 1, 1.0, 0]], version))
    assert caught.value.reason == "schema.version"
    receipt = cbor2.dumps({1: version, 2: "gw", 3: []})
    with pytest.raises(SchemaError):
        decode_receipt(receipt)


def test_an_all_zero_or_small_order_public_key_is_refused_at_registration() -> None:
    from civicmesh.identity import derive_id

    for weak in (bytes(32), b"\x01" + bytes(31)):
        key = VerifyKey(weak).to_text()
        with pytest.raises(ValueError, match="weak"):
            DeviceRecord(derive_id(weak), key, "z1")
        with pytest.raises(ValueError, match="weak"):
            GatewayRecord(derive_id(weak), key)
    good = signer("g")
    DeviceRecord(good.key_id, good.verify_key().to_text(), "z1")  # still accepted


# ------------------------------------------------------------------- registry (item 4)


def test_an_unreadable_registry_file_keeps_the_last_good_registry(tmp_path: Path) -> None:
    dev = signer("r")
    path = tmp_path / "registry.json"
    Registry.empty().with_device(DeviceRecord(dev.key_id, dev.verify_key().to_text(), "z1")).save(
        path
    )
    registry = RegistryFile(path)
    assert registry.device_key(dev.key_id) is not None
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # an editor half way through writing in place
    assert registry.device_key(dev.key_id) is not None, "the last good registry is kept"
    assert registry.reload_failures >= 1
    path.unlink()  # and a moment without the file at all
    assert registry.device_key(dev.key_id) is not None
    path.write_text(text)  # the edit finished: read again
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert registry.device_key(dev.key_id) is not None
    # At start, though, a broken file is an error with the file's name in it.
    path.write_text("{")
    with pytest.raises(RegistryError, match=r"registry\.json"):
        RegistryFile(path)


# ----------------------------------------------------------- durable queue (items 8, 15.4)


def add_trigger(db_path: Path, table: str, event: str) -> None:
    """Make every ``event`` (INSERT/UPDATE/DELETE) on ``table`` fail from now on, through
    a second connection: the SQLite error is injected inside the owner's transaction."""
    with sqlite3.connect(db_path) as other:
        other.execute(
            f"CREATE TRIGGER inject_{event.lower()} BEFORE {event} ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )


def drop_trigger(db_path: Path, event: str) -> None:
    with sqlite3.connect(db_path) as other:
        other.execute(f"DROP TRIGGER inject_{event.lower()}")


def test_the_queue_rolls_back_on_any_error(tmp_path: Path) -> None:
    from civicmesh.queue import DurableQueue, QueueError

    queue = DurableQueue(tmp_path / "q.db", [(1, "t", "CREATE TABLE t (x INTEGER)")])
    with pytest.raises(QueueError, match="no such table"), queue.write() as db:
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO missing VALUES (1)")
    with pytest.raises(RuntimeError), queue.write() as db:
        db.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("a bug in the caller")
    with queue.write() as db:  # no "cannot start a transaction within a transaction"
        db.execute("INSERT INTO t VALUES (3)")
    with queue.read() as db:
        assert db.execute("SELECT x FROM t").fetchall() == [(3,)]
    queue.close()


def test_outbox_stays_usable_after_an_sqlite_error_mid_transaction(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    dev = signer("o")
    outbox.add([Reading(T0 + i * 60_000, "no2", float(i)) for i in range(10)])
    batch = outbox.seal(dev, 5)
    assert batch is not None
    add_trigger(path, "sealed", "UPDATE")
    with pytest.raises(Exception, match="injected failure"):
        outbox.mark_sent([batch.seq])
    drop_trigger(path, "UPDATE")
    outbox.mark_sent([batch.seq])  # the connection is not stuck in a transaction
    assert outbox.seal(dev, 5) is not None
    assert outbox.stats().last_seq == 2
    outbox.close()


def test_gateway_buffer_stays_usable_after_an_sqlite_error(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = GatewayBuffer(path)
    buffer.enqueue("t", b"one")
    (item,) = buffer.pending(10)
    add_trigger(path, "outgoing", "UPDATE")
    with pytest.raises(Exception, match="injected failure"):
        buffer.mark_forwarded([item[0]])
    drop_trigger(path, "UPDATE")
    buffer.mark_forwarded([item[0]])
    buffer.enqueue("t", b"two")
    assert buffer.backlog() == 2
    buffer.close()


# -------------------------------------------------------------- outbox bounds (item 7)


def test_the_bound_covers_sealed_batches_too(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_readings=1000)
    dev = signer("s")
    for hour in range(50):  # offline: everything gets sealed, nothing is confirmed
        outbox.add([Reading(T0 + (hour * 100 + i) * 1000, "pm25", 1.0) for i in range(100)])
        while outbox.seal(dev, 100):
            pass
    stats = outbox.stats()
    assert stats.pending_readings + stats.sealed_readings <= 1000
    assert stats.dropped_total == 4000 and stats.dropped_batches == 40
    # Oldest first: what is left is the newest ten batches, still a chain in order.
    seqs = [seq for seq, _ in outbox.unsent(1000)]
    assert seqs == list(range(41, 51))
    outbox.close()


def test_the_byte_bound_drops_oldest_sealed_batches(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_readings=10**6, max_bytes=200_000)
    dev = signer("y")
    for hour in range(60):
        outbox.add([Reading(T0 + (hour * 500 + i) * 1000, "pm25", 1.5) for i in range(500)])
        while outbox.seal(dev, 500):
            pass
    stats = outbox.stats()
    assert stats.bytes <= 200_000 and stats.dropped_batches > 0
    outbox.close()


def test_agent_health_reports_dropped_total(tmp_path: Path) -> None:
    from test_edge import RampDriver, settings_for

    settings = settings_for(tmp_path).model_copy(update={"outbox_max_readings": 1000})
    agent = EdgeAgent(settings, signer("h"), RampDriver(), None)
    agent.collect(T0 + 2 * DAY_MS)  # 2880 readings of one minute, offline
    agent.seal_all()
    health = agent.health()
    assert health["dropped_total"] == 2880 - 1000
    assert health["outbox"]["dropped_total"] == 2880 - 1000
    agent.close()


# ------------------------------------------------- replays and long gaps (items 9, 20.6)


def test_a_driver_that_replays_its_history_queues_nothing_twice(tmp_path: Path) -> None:
    from test_edge import RampDriver, settings_for

    settings = settings_for(tmp_path)
    for _restart in range(3):  # each start reads the source from its beginning again
        agent = EdgeAgent(settings, signer("p"), RampDriver(T0), None)
        agent.collect(T0 + 60 * 60_000)
        agent.seal_all()
        stats = agent.outbox.stats()
        agent.close()
    assert stats.sealed_readings + stats.pending_readings == 60
    assert stats.last_seq == 9  # 60 readings in batches of 7, sealed once
    assert stats.replayed_total == 120


def test_a_gap_longer_than_a_week_splits_batches_instead_of_crashing(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    dev = signer("w")
    before = [Reading(T0 + i * 60_000, "co", 0.4) for i in range(5)]
    after = [Reading(T0 + 15 * DAY_MS + i * 60_000, "co", 0.5) for i in range(5)]
    outbox.add(before + after)
    first = outbox.seal(dev, 500)
    second = outbox.seal(dev, 500)
    assert first is not None and second is not None and outbox.seal(dev, 500) is None
    assert [r.value for r in first.payload.readings] == [0.4] * 5
    assert [r.value for r in second.payload.readings] == [0.5] * 5
    assert second.payload.prev_hash == first.hash
    outbox.close()


# ---------------------------------------------------- MQTT links (items 1 and 6, real broker)


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.integration
def test_a_handler_that_raises_does_not_take_the_link_down(mosquitto: Any) -> None:
    got: list[bytes] = []
    failed: list[tuple[str, str]] = []

    def handler(message: Message) -> None:
        if message.payload == b"poison":
            raise OverflowError("int too large to convert to float")
        got.append(message.payload)
        link.ack(message)

    def on_error(message: Message, exc: Exception) -> bool:
        failed.append((message.topic, type(exc).__name__))
        return True

    link = MqttLink(mosquitto.url, "guarded", persistent=True, manual_ack=True)
    pub = MqttLink(mosquitto.url, "pub")
    link.subscribe("t/#", handler, on_error=on_error)
    link.connect()
    pub.connect()
    try:
        pub.publish("t/a", b"poison")
        pub.publish("t/a", b"good")
        wait_for(lambda: got == [b"good"])
        assert link.is_connected and link.healthy and link.handler_errors == 1
        assert failed == [("t/a", "OverflowError")]
        # The poison was acknowledged: a restart of the subscriber does not get it again.
        link.close()
        link.connect()
        pub.publish("t/a", b"after")
        wait_for(lambda: got == [b"good", b"after"])
        assert link.handler_errors == 1, "the poison was not delivered again"
    finally:
        link.close()
        pub.close()


@pytest.mark.integration
# The thread's death is the point: pytest reports the exception that ended it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_link_whose_network_thread_died_is_noticed_and_rebuilt(mosquitto: Any) -> None:
    got: list[bytes] = []

    def handler(message: Message) -> None:
        if message.payload == b"die":
            raise SystemExit  # escapes every guard: paho's thread ends
        got.append(message.payload)

    link = MqttLink(mosquitto.url, "dying")
    pub = MqttLink(mosquitto.url, "pub2")
    link.subscribe("d/#", handler, qos=0)
    link.connect()
    pub.connect()
    try:
        pub.publish("d/x", b"die")
        wait_for(lambda: not link.healthy)
        assert not link.is_connected  # no "connected" on a dead thread
        wait_for(link.maintain)
        assert link.healthy and link.rebuilds == 1

        # The renewed subscription is sent on connect without waiting for its SUBACK:
        # at QoS 0 a message may pass it, so publish until one arrives.
        def delivered() -> bool:
            pub.publish("d/x", b"alive")
            time.sleep(0.2)
            return b"alive" in got

        wait_for(delivered)
    finally:
        link.close()
        pub.close()


@pytest.mark.integration
def test_an_agent_that_boots_offline_connects_when_the_broker_comes(
    tmp_path: Path, mosquitto: Any
) -> None:
    from test_edge import RampDriver, settings_for

    mosquitto.stop()
    dev = signer("n")
    settings = settings_for(tmp_path, mosquitto.url).model_copy(
        update={"publish_interval_s": 0.2, "await_receipts": False}
    )
    now = (time.time_ns() // 10**6 // 60_000) * 60_000
    agent = EdgeAgent(settings, dev, RampDriver(now - 30 * 60_000), None)
    link = MqttLink(mosquitto.url, f"agent-{dev.key_id}")
    agent.link = link
    with pytest.raises(Exception, match="Cannot connect"):
        link.connect(timeout=2)  # what `civicmesh edge run` does first, and survives
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    runner.start()
    try:
        time.sleep(2)
        assert agent.outbox.stats().sealed_batches > 0 and agent.published == 0
        mosquitto.start()
        # Broker acknowledgements release the batches (await_receipts off): all sent.
        wait_for(lambda: agent.published > 0 and agent.outbox.stats().sealed_batches == 0, 60)
        assert link.is_connected
    finally:
        stop.set()
        runner.join(20)
        link.close()
        agent.close()
    assert not runner.is_alive()


# ------------------------------------------------------- chain rules at the gateway (item 10)


@pytest.mark.integration
def test_a_gap_fill_that_links_to_nothing_is_quarantined(
    tmp_path: Path, system_mqtt_url: str
) -> None:
    from test_gateway import Rig, chain, stored_seqs

    rig = Rig(tmp_path, system_mqtt_url, {"gap_hold_s": 0})
    try:
        batches = chain(rig.device, 5)
        rig.publish(rig.device.key_id, batches[0].message)
        rig.publish(rig.device.key_id, batches[4].message)  # seq 5 across a gap
        rig.wait(lambda: stored_seqs(rig) == [1, 5])
        # A "seq 3" whose prev_hash is random: seqs 2 and 4 are unknown, so nothing it
        # names can be checked. Before: stored as a gap fill.
        forged = seal_batch(rig.device, make_payload(rig.device.key_id, 3, os.urandom(32), T0, []))
        rig.publish(rig.device.key_id, forged.message)
        rig.wait(lambda: "chain.fork" in rig.reasons())
        time.sleep(0.5)
        assert stored_seqs(rig) == [1, 5]
        (record,) = [r for r in rig.store.quarantined(100) if r.reason == "chain.fork"]
        assert "links to no batch" in record.detail
    finally:
        rig.close()


@pytest.mark.integration
def test_a_batch_that_jumps_ahead_is_held_until_it_links(
    tmp_path: Path, system_mqtt_url: str
) -> None:
    from test_gateway import Rig, chain, stored_seqs

    rig = Rig(tmp_path, system_mqtt_url, {"gap_hold_s": 3})
    try:
        batches = chain(rig.device, 3)
        rig.publish(rig.device.key_id, batches[0].message)
        rig.wait(lambda: stored_seqs(rig) == [1])
        # Seq 500 with a random prev_hash (another gateway's relay, a clone...).
        jump = seal_batch(rig.device, make_payload(rig.device.key_id, 500, os.urandom(32), T0, []))
        rig.publish(rig.device.key_id, jump.message)
        time.sleep(1.5)
        assert stored_seqs(rig) == [1], "held, not forwarded as if it continued the chain"
        # Its hold ends unlinked: forwarded, with a chain.gap record saying so.
        rig.wait(lambda: stored_seqs(rig) == [1, 500], timeout=20)
        rig.wait(lambda: "chain.gap" in rig.reasons())
        assert rig.gateway.stats()["gaps_released_unlinked"] == 1
    finally:
        rig.close()


# ------------------------------------------------------------ a small, full disk (item 7)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 5 MiB tmpfs (needs root: ``mount -t tmpfs``), unmounted afterwards."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("min_free", [0, 1024 * 1024], ids=["disk-full", "reserve"])
def test_a_long_outage_on_a_small_disk_keeps_the_agent_within_it(
    tmp_path: Path, small_disk: Path, min_free: int
) -> None:
    import shutil

    from test_edge import RampDriver, settings_for

    settings = settings_for(tmp_path).model_copy(
        update={
            "state_dir": small_disk / "state",
            "batch_max_readings": 500,
            "outbox_max_bytes": 64 * 1024 * 1024,  # more than the disk holds
            "outbox_min_free_bytes": min_free,
        }
    )
    agent = EdgeAgent(settings, signer("d"), RampDriver(T0), None)
    lowest_free = shutil.disk_usage(small_disk).free
    try:
        for day in range(1, 241):  # eight months offline, one reading a minute
            agent.collect(T0 + day * DAY_MS)
            agent.seal_all()
            lowest_free = min(lowest_free, shutil.disk_usage(small_disk).free)
        stats = agent.outbox.stats()
        health = agent.health()
    finally:
        agent.close()
    assert stats.dropped_total > 0 and health["dropped_total"] == stats.dropped_total
    # The newest readings are kept (oldest-first drop), and sealing went on to the end.
    assert stats.last_seq >= 240 * 1440 // 500
    outbox = Outbox(settings.state_dir / "outbox.db")
    newest = max(seq for seq, _ in outbox.unsent(10**6))
    assert newest == stats.last_seq or stats.pending_readings > 0
    with sqlite3.connect(settings.state_dir / "outbox.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = stats.pending_readings + stats.sealed_readings
    assert kept + stats.dropped_total + stats.replayed_total == 240 * 1440
    outbox.close()
    if min_free:
        assert lowest_free >= min_free - 512 * 1024, "the reserve was kept, about"


@pytest.mark.integration
def test_a_bignum_batch_is_quarantined_and_the_gateway_keeps_relaying(
    tmp_path: Path, system_mqtt_url: str
) -> None:
    from test_gateway import Rig, chain, stored_seqs

    rig = Rig(tmp_path, system_mqtt_url)
    try:
        poison = raw_batch(rig.device, [[0, 1, 2**1100, 0]])
        rig.publish(rig.device.key_id, poison)
        (good,) = chain(rig.other, 1)
        rig.publish(rig.other.key_id, good.message)
        rig.wait(lambda: rig.store.ledger(rig.other.key_id) != [])
        rig.wait(lambda: "schema.invalid" in rig.reasons())
        assert rig.dev_link.is_connected and rig.dev_link.handler_errors == 0
        assert stored_seqs(rig) == []  # the poison was not stored
    finally:
        rig.close()


def test_the_gateway_buffer_is_bounded_kept_envelopes_going_first(tmp_path: Path) -> None:
    from civicmesh.protocol import message_digest

    buffer = GatewayBuffer(tmp_path / "b.db", max_envelopes=5, max_bytes=10**6)
    for i in range(3):
        buffer.enqueue("t", f"old-{i}".encode())
    ids = [item[0] for item in buffer.pending(10)]
    buffer.mark_forwarded(ids[:2])
    buffer.confirm([message_digest(b"old-0"), message_digest(b"old-1")])  # kept for replay
    for i in range(5):
        buffer.enqueue("t", f"new-{i}".encode())
    assert buffer.size()[0] == 5
    # The two confirmed ones went first, then the oldest unconfirmed (counted).
    assert [body for _, _, body in buffer.pending(10)] == [f"new-{i}".encode() for i in range(5)]
    assert buffer.dropped_total() == 1
    small = GatewayBuffer(tmp_path / "c.db", max_envelopes=100, max_bytes=1000)
    for i in range(20):
        small.enqueue("t", bytes([i]) * 100)
    assert small.size()[1] <= 1000 and small.dropped_total() == 10
    buffer.close()
    small.close()
