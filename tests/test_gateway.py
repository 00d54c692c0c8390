"""Gateway + ingest on real Mosquitto: good batches are forwarded and stored; garbage, a
wrong signature, an unknown device, a replayed seq and a topic/signer mismatch published
to the device topic land in the central quarantine with their reason, and the services
keep running."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from analytics.ingest import IngestWorker
from analytics.ingest.receive import Receiver
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh import topics
from civicmesh.config import load_settings
from civicmesh.custody import ResendPlan
from civicmesh.errors import RegistryError
from civicmesh.identity import BoundSigner, Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    Receipt,
    SignatureError,
    SignedBatch,
    decode_receipt,
    encode_rotation,
    make_payload,
    message_digest,
    seal_batch,
)
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
from civicmesh.timeutil import now_ms
from gateway.relay import Gateway
from gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000


def chain(signer: Ed25519Signer, count: int) -> list[SignedBatch]:
    out, prev = [], GENESIS_HASH
    for seq in range(1, count + 1):
        reading = Reading(T0 + seq * 60_000, "no2", 20.0 + seq)
        batch = seal_batch(signer, make_payload(signer.key_id, seq, prev, T0, [reading]))
        out.append(batch)
        prev = batch.hash
    return out


class Rig:
    def __init__(
        self, tmp_path: Path, url: str, gateway_overrides: dict[str, Any] | None = None
    ) -> None:
        self.device = Ed25519Signer.from_seed(os.urandom(32))
        self.other = Ed25519Signer.from_seed(os.urandom(32))
        self.gw = Ed25519Signer.from_seed(os.urandom(32))
        registry = (
            Registry.empty()
            .with_gateway(GatewayRecord(self.gw.key_id, self.gw.verify_key().to_text()))
            .with_device(DeviceRecord(self.device.key_id, self.device.verify_key().to_text(), "z1"))
            .with_device(DeviceRecord(self.other.key_id, self.other.verify_key().to_text(), "z1"))
        )
        path = tmp_path / "registry.json"
        registry.save(path)
        self.registry_path = path
        self.store: Store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        self.store.migrate()
        tag = self.gw.key_id
        settings = load_settings(
            AnalyticsSettings,
            None,
            {
                "registry_file": str(path),
                "mqtt": {"url": url},
                "ingest": {"shared_group": f"t-{tag}"},  # no other session takes a share
            },
        )
        self.ingest_link = MqttLink(url, f"t-ingest-{tag}", manual_ack=True)
        self.ingest = IngestWorker(settings, self.store, RegistryFile(path), self.ingest_link, tag)
        self.ingest.start()
        self.ingest_link.wait_connected(10)
        gw_settings = load_settings(
            GatewaySettings,
            None,
            {
                "registry_file": str(path),
                "state_dir": str(tmp_path / "gw"),
                "key_file": "x",
                **(gateway_overrides or {}),
            },
        )
        self.dev_link = MqttLink(url, f"t-gwdev-{tag}", manual_ack=True)
        self.up_link = MqttLink(url, f"t-gwup-{tag}")
        self.gateway = Gateway(
            gw_settings, self.gw, RegistryFile(path), self.dev_link, self.up_link
        )
        self.gateway.start()
        self.up_link.connect()
        self.dev_link.connect()
        self.pub = MqttLink(url, f"t-pub-{tag}")
        self.pub.connect()

    def publish(self, device_id: str, payload: bytes) -> None:
        self.pub.publish(topics.device_up(device_id), payload)

    def wait(self, predicate: object, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.05)

    def reasons(self) -> list[str]:
        mine = {self.device.key_id, self.other.key_id, None}
        return sorted(
            r.reason
            for r in self.store.quarantined(1000)
            if r.source.endswith(self.gw.key_id) and r.device_id in mine
        )

    def close(self) -> None:
        self.dev_link.close()
        self.gateway.stop()
        self.up_link.close()
        self.ingest.stop()
        self.ingest_link.close()
        self.pub.close()
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path, system_mqtt_url: str) -> Iterator[Rig]:
    rig = Rig(tmp_path, system_mqtt_url)
    try:
        yield rig
    finally:
        rig.close()


def stored_seqs(rig: Rig) -> list[int]:
    return [entry.seq for entry in rig.store.ledger(rig.device.key_id)]


def test_valid_batches_are_forwarded_and_stored_unchanged(rig: Rig) -> None:
    batches = chain(rig.device, 5)
    for batch in batches:
        rig.publish(rig.device.key_id, batch.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4, 5])
    ledger = rig.store.ledger(rig.device.key_id)
    assert [e.device_message for e in ledger] == [b.message for b in batches]
    assert all(e.gateway_id == rig.gw.key_id for e in ledger)


def test_bad_input_is_quarantined_with_reasons_and_service_keeps_running(rig: Rig) -> None:
    batches = chain(rig.device, 4)
    rig.publish(rig.device.key_id, batches[0].message)
    rig.publish(rig.device.key_id, batches[1].message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2])

    rig.publish(rig.device.key_id, b"\x00garbage\xff")
    tampered = bytearray(batches[2].message)
    tampered[-1] ^= 0x01
    rig.publish(rig.device.key_id, bytes(tampered))
    stranger = Ed25519Signer.from_seed(os.urandom(32))
    unknown = seal_batch(stranger, make_payload(stranger.key_id, 1, GENESIS_HASH, T0, []))
    rig.publish(stranger.key_id, unknown.message)
    rig.publish(rig.device.key_id, batches[0].message)  # replayed: recorded and receipted
    old = seal_batch(rig.device, make_payload(rig.device.key_id, 1, GENESIS_HASH, T0 + 1, []))
    rig.publish(rig.device.key_id, old.message)  # an old seq with other content: a fork
    rig.publish(rig.other.key_id, batches[2].message)  # right device's batch, wrong topic

    expected = sorted(
        [
            "decode.malformed",
            "signature.invalid",
            "chain.fork",
            "chain.replay",
            "topic.device_mismatch",
        ]
    )
    rig.wait(lambda: rig.reasons() == expected)
    unknown_records = [
        r for r in rig.store.quarantined(1000) if r.reason == "signature.unknown_signer"
    ]
    assert any(r.device_id == stranger.key_id for r in unknown_records)

    # Still running: the rest of the chain goes through.
    rig.publish(rig.device.key_id, batches[2].message)
    rig.publish(rig.device.key_id, batches[3].message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4])
    stats = rig.gateway.stats()
    assert stats["quarantined_by_reason"]["chain.fork"] == 1
    assert stats["quarantined_by_reason"]["chain.replay"] == 1
    assert stats["duplicates"] == 1
    rig.wait(lambda: rig.gateway.stats()["backlog"] == 0)


def test_chain_heads_survive_a_gateway_restart(tmp_path: Path) -> None:
    from gateway.buffer import GatewayBuffer

    buffer = GatewayBuffer(tmp_path / "b.db")
    buffer.accept("aaaaaaaaaaaaaaaa", 3, b"h" * 32, "t", b"env", b"device message")
    buffer.close()
    reopened = GatewayBuffer(tmp_path / "b.db")
    head = reopened.head("aaaaaaaaaaaaaaaa")
    assert head is not None and head.seq == 3 and head.hash == b"h" * 32
    assert [(t, b) for _, t, b in reopened.pending(10)] == [("t", b"env")]
    reopened.close()


def test_buffer_forwards_again_what_has_no_receipt(tmp_path: Path) -> None:
    from gateway.buffer import GatewayBuffer

    buffer = GatewayBuffer(tmp_path / "b.db")
    buffer.accept("aaaaaaaaaaaaaaaa", 1, b"h" * 32, "up", b"envelope-1", b"device-1")
    buffer.enqueue("quarantine", b"record")
    ids = [i for i, _, _ in buffer.pending(10)]
    buffer.mark_forwarded(ids)  # upstream PUBACK
    now = time.time_ns() // 10**6
    assert buffer.pending(10) == []
    assert buffer.backlog() == 2  # forwarded, not yet confirmed

    confirmed, newest = buffer.confirm([message_digest(b"envelope-1")])
    assert confirmed == 1 and newest is not None and newest <= now
    assert buffer.confirm([message_digest(b"envelope-1")]) == (0, None)
    # What the plan names is forwarded again: only the unconfirmed one.
    plan = ResendPlan(now + 1, 0, 0)
    assert [(t, b) for _, t, b in buffer.pending(10, plan)] == [("quarantine", b"record")]
    assert [b for _, _, b in buffer.pending(10, ResendPlan(0, 5, now + 1))] == [b"record"]
    assert buffer.known_digest("aaaaaaaaaaaaaaaa", 1) == message_digest(b"device-1")
    assert buffer.known_digest("aaaaaaaaaaaaaaaa", 2) is None
    buffer.close()
    reopened = GatewayBuffer(tmp_path / "b.db")
    assert reopened.backlog() == 1
    assert reopened.prune(now + 10_000) == 1  # only confirmed envelopes are pruned
    assert reopened.backlog() == 1
    reopened.close()


def test_devices_get_receipts_for_buffered_and_resent_batches(rig: Rig) -> None:
    receipts: list[Receipt] = []
    rig.pub.subscribe(
        topics.device_receipt(rig.device.key_id),
        lambda m: receipts.append(decode_receipt(m.payload)),
    )
    batches = chain(rig.device, 2)
    for batch in batches:
        rig.publish(rig.device.key_id, batch.message)
    rig.wait(lambda: sum(len(r.digests) for r in receipts) == 2)
    assert [d for r in receipts for d in r.digests] == [message_digest(b.message) for b in batches]
    assert all(r.issuer == rig.gw.key_id for r in receipts)
    # Ingest's receipts confirm the forwarded envelopes: nothing left to forward again.
    rig.wait(lambda: rig.gateway.stats()["backlog"] == 0)
    assert rig.gateway.stats()["confirmed"] == 2

    rig.publish(rig.device.key_id, batches[0].message)  # its receipt was "lost"
    rig.wait(lambda: sum(len(r.digests) for r in receipts) == 3)
    assert receipts[-1].digests == (message_digest(batches[0].message),)
    assert rig.gateway.stats()["duplicates"] == 1
    assert stored_seqs(rig) == [1, 2]
    rig.wait(lambda: rig.reasons() == ["chain.replay"])  # recorded, not forwarded


def test_a_batch_lost_on_the_way_fills_its_gap_when_re_sent(rig: Rig) -> None:
    batches = chain(rig.device, 4)
    for batch in (batches[0], batches[2], batches[3]):  # seq 2 lost on the way
        rig.publish(rig.device.key_id, batch.message)
    rig.wait(lambda: rig.gateway.stats().get("accepted") == 3)
    assert rig.gateway.stats()["chain_gaps"] == 1
    # Seq 3 cannot be linked yet: it is held (and seq 4 behind it), not forwarded.
    time.sleep(1)
    assert stored_seqs(rig) == [1] and rig.gateway.buffer.held() == 1

    # A different seq 2 does not link to seq 3: a fork, quarantined.
    other = seal_batch(rig.device, make_payload(rig.device.key_id, 2, batches[0].hash, T0 + 7, []))
    rig.publish(rig.device.key_id, other.message)
    rig.publish(rig.device.key_id, batches[1].message)  # the real one, re-sent
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4])
    rig.wait(lambda: rig.reasons() == ["chain.fork"])
    stats = rig.gateway.stats()
    assert stats["gaps_filled"] == 1 and stats["gaps_linked"] == 1
    assert rig.store.ledger(rig.device.key_id)[1].device_message == batches[1].message
    # The head stayed at seq 4: the chain goes on from there.
    extra = seal_batch(rig.device, make_payload(rig.device.key_id, 5, batches[3].hash, T0 + 9, []))
    rig.publish(rig.device.key_id, extra.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4, 5])


def health_report(device: str, t: int, batches: int) -> bytes:
    return json.dumps(
        {
            "device_id": device,
            "agent_version": "0.1.0",
            "model_version": "cal-2",
            "driver": "sim",
            "time_ms": T0 + t,
            "published": 1,
            "confirmed": 1,
            "outbox": {
                "pending_readings": 7,
                "sealed_batches": batches,
                "unpublished_batches": 0,
                "oldest_pending_ms": None,
                "last_seq": 3,
                "dropped_total": 0,
            },
        }
    ).encode()


def test_agent_health_is_relayed_and_kept_newest_first(rig: Rig) -> None:
    stranger = Ed25519Signer.from_seed(os.urandom(32))
    rig.pub.publish(topics.device_health(stranger.key_id), health_report(stranger.key_id, 1, 1))
    rig.pub.publish(topics.device_health(rig.device.key_id), b"{not json")
    rig.pub.publish(topics.device_health(rig.other.key_id), health_report(rig.device.key_id, 1, 1))
    rig.pub.publish(
        topics.device_health(rig.device.key_id), health_report(rig.device.key_id, 2000, 5)
    )
    rig.wait(lambda: rig.store.device_health())
    rig.pub.publish(
        topics.device_health(rig.device.key_id), health_report(rig.device.key_id, 1000, 9)
    )
    rig.wait(lambda: rig.gateway.stats().get("health_relayed", 0) >= 2)
    time.sleep(0.6)  # the older report reached ingest too, and must not win
    (kept,) = rig.store.device_health()
    assert (kept.device_id, kept.outbox_batches, kept.outbox_readings) == (rig.device.key_id, 5, 7)
    assert kept.gateway_id == rig.gw.key_id and kept.model_version == "cal-2"
    # the stranger, the malformed message and the one naming another device were dropped
    assert rig.gateway.stats()["health_dropped"] == 3


def test_health_through_amqtt_is_delivered_at_qos_0(
    tmp_path: Path, embedded_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """amqtt delivers at the subscription's QoS: health subscribed at QoS 1 arrived as
    QoS 1, was never acknowledged, and the broker logged a PUBACK timeout for each one."""
    delivered: list[tuple[str, int]] = []
    for owner, method in ((Gateway, "_on_health"), (Receiver, "on_health")):
        original = getattr(owner, method)

        def spy(self: Any, message: Any, original: Any = original, name: str = owner.__name__):
            delivered.append((name, message.qos))
            original(self, message)

        monkeypatch.setattr(owner, method, spy)
    rig = Rig(tmp_path, embedded_broker.url)
    try:
        report = health_report(rig.device.key_id, 1000, 2)
        rig.pub.publish(topics.device_health(rig.device.key_id), report, qos=0)
        rig.wait(lambda: rig.store.device_health())
        assert sorted(delivered) == [("Gateway", 0), ("Receiver", 0)]
    finally:
        rig.close()


def test_a_revoked_device_is_refused_from_its_next_batch_on(rig: Rig) -> None:
    batches = chain(rig.device, 3)
    rig.publish(rig.device.key_id, batches[0].message)
    rig.wait(lambda: stored_seqs(rig) == [1])
    # the operator revokes it (civicmesh registry revoke-device, or the admin API)
    Registry.load(rig.registry_path).revoke_device(rig.device.key_id).save(rig.registry_path)
    rig.publish(rig.device.key_id, batches[1].message)
    rig.wait(
        lambda: any(
            r.reason == "signature.unknown_signer" and r.device_id == rig.device.key_id
            for r in rig.store.quarantined(1000)
        )
    )
    time.sleep(0.5)
    assert stored_seqs(rig) == [1]  # nothing after the revocation was stored


def test_after_losing_the_store_the_gateway_buffer_replays_everything(rig: Rig) -> None:
    batches = chain(rig.device, 4)
    for batch in batches:
        rig.publish(rig.device.key_id, batch.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4])
    rig.wait(lambda: rig.gateway.buffer.backlog() == 0)  # all confirmed by ingest's receipts
    # the central database is lost: ledger and readings gone
    path = rig.store.path  # type: ignore[attr-defined]
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM readings")
        db.execute("DELETE FROM batches")
        for table in ("audit_cosignatures", "audit_checkpoints", "audit_nodes", "audit_leaves"):
            db.execute(f"DELETE FROM {table}")  # the audit log went with it
        db.execute("UPDATE audit_head SET size = 0")
    assert stored_seqs(rig) == []
    assert rig.gateway.buffer.requeue(0) == 4  # civicmesh gateway replay --since ...
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4])
    ledger = rig.store.ledger(rig.device.key_id)
    assert [e.device_message for e in ledger] == [b.message for b in batches]


def _next(signer: Any, seq: int, prev: bytes) -> SignedBatch:
    reading = Reading(T0 + seq * 60_000, "no2", 30.0 + seq)
    return seal_batch(signer, make_payload(signer.key_id, seq, prev, T0, [reading]))


def test_key_rotation_new_key_works_old_one_stops_after_the_window(rig: Rig) -> None:
    device_id = rig.device.key_id
    first = _next(rig.device, 1, GENESIS_HASH)
    rig.publish(device_id, first.message)
    rig.wait(lambda: stored_seqs(rig) == [1])
    # the device announces its next key, signed by the current one; the operator applies it
    new_key = Ed25519Signer.generate()
    announcement = encode_rotation(rig.device, new_key.public_key, now_ms())
    registry, rotated = Registry.load(rig.registry_path).rotate_device_key(
        announcement, 3_600_000, now_ms()
    )
    assert rotated == device_id
    registry.save(rig.registry_path)
    with pytest.raises(RegistryError, match="applied already"):  # an announcement counts once
        Registry.load(rig.registry_path).rotate_device_key(announcement, 0, now_ms())
    signer = BoundSigner(new_key, device_id)  # the same device id, the new key
    second = _next(signer, 2, first.hash)
    rig.publish(device_id, second.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2])
    # within the overlap a batch the old key sealed (an outbox backlog) still counts
    third = _next(rig.device, 3, second.hash)
    rig.publish(device_id, third.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3])
    # the window ends: the old key is refused, the new one goes on
    record = Registry.load(rig.registry_path).devices[device_id]
    ended = replace(record, previous_key_until_ms=now_ms() - 1)
    Registry.load(rig.registry_path).with_device(ended).save(rig.registry_path)
    stale = _next(rig.device, 4, third.hash)
    rig.publish(device_id, stale.message)
    rig.wait(lambda: "signature.invalid" in rig.reasons())
    fourth = _next(signer, 4, third.hash)
    rig.publish(device_id, fourth.message)
    rig.wait(lambda: stored_seqs(rig) == [1, 2, 3, 4])
    assert rig.store.ledger(device_id)[-1].payload_hash == fourth.hash
    # after the window the old key cannot even re-apply its announcement
    with pytest.raises(SignatureError):
        Registry.load(rig.registry_path).rotate_device_key(announcement, 0, now_ms())
    # only the device's own key can announce its next one
    forged = encode_rotation(BoundSigner(rig.other, device_id), rig.other.public_key, now_ms())
    with pytest.raises(SignatureError):
        Registry.load(rig.registry_path).rotate_device_key(forged, 0, now_ms())


def test_a_device_signing_with_es256_goes_through_gateway_and_ingest(rig: Rig) -> None:
    from civicmesh.identity import Es256Signer

    chip = Es256Signer.generate()  # a stand-in for a secure element: same interface
    record = DeviceRecord(chip.key_id, chip.verify_key().to_text(), "z1")
    Registry.load(rig.registry_path).with_device(record).save(rig.registry_path)
    # ingest learns devices from the registry; the store needs the device too
    rig.store.upsert_devices([record])
    first = _next(chip, 1, GENESIS_HASH)
    second = _next(chip, 2, first.hash)
    for batch in (first, second):
        rig.publish(chip.key_id, batch.message)
    rig.wait(lambda: [e.seq for e in rig.store.ledger(chip.key_id)] == [1, 2])
    assert rig.store.ledger(chip.key_id)[0].device_message == first.message


def test_gateways_follow_signed_registry_snapshots_and_fail_closed(
    tmp_path: Path, system_mqtt_url: str
) -> None:
    from civicmesh.registry_cli import publish_snapshot

    authority = Ed25519Signer.generate()
    rig = Rig(tmp_path, system_mqtt_url, {"registry_authority": authority.verify_key().to_text()})
    central = tmp_path / "central-registry.json"
    central.write_text(rig.registry_path.read_text())
    device_id = rig.device.key_id
    batches = chain(rig.device, 3)
    try:
        # no snapshot yet: held, neither stored nor quarantined (the device keeps it)
        # (sent again until seen: the gateway's subscription may not be in place yet)
        for _ in range(30):
            rig.publish(device_id, batches[0].message)
            if rig.gateway.stats().get("held_registry_expired", 0) >= 1:
                break
            time.sleep(0.5)
        rig.wait(lambda: rig.gateway.stats().get("held_registry_expired", 0) >= 1)
        assert stored_seqs(rig) == [] and rig.reasons() == []
        # a snapshot signed by someone else changes nothing
        publish_snapshot(rig.pub, central, Ed25519Signer.generate(), 60_000)
        rig.wait(lambda: rig.gateway.stats().get("registry_refused", 0) >= 1)
        # the authority's snapshot: applied, and the device's batches flow
        publish_snapshot(rig.pub, central, authority, 60_000)
        rig.wait(lambda: rig.gateway.stats().get("registry_applied", 0) >= 1)
        rig.publish(device_id, batches[0].message)
        rig.wait(lambda: stored_seqs(rig) == [1])
        # the centre revokes the device: the next snapshot carries it to the gateway
        Registry.load(central).revoke_device(device_id).save(central)
        publish_snapshot(rig.pub, central, authority, 60_000)
        rig.wait(lambda: rig.gateway.stats().get("registry_applied", 0) >= 2)
        rig.publish(device_id, batches[1].message)
        rig.wait(lambda: "signature.unknown_signer" in rig.reasons())
        assert stored_seqs(rig) == [1]
        # a snapshot that has expired: the gateway holds everything until a current one
        publish_snapshot(rig.pub, central, authority, 300)
        rig.wait(lambda: rig.gateway.stats().get("registry_applied", 0) >= 3)
        time.sleep(0.5)
        held = rig.gateway.stats().get("held_registry_expired", 0)
        rig.publish(rig.other.key_id, chain(rig.other, 1)[0].message)
        rig.wait(lambda: rig.gateway.stats().get("held_registry_expired", 0) > held)
        assert rig.store.ledger(rig.other.key_id) == []
    finally:
        rig.pub.publish(topics.REGISTRY_SNAPSHOT, b"", retain=True)  # clear the shared broker
        rig.close()
