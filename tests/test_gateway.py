"""Gateway + ingest on real Mosquitto: good batches are forwarded and stored; garbage, a
wrong signature, an unknown device, a replayed seq and a topic/signer mismatch published
to the device topic land in the central quarantine with their reason, and the services
keep running."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from analytics.ingest import IngestWorker
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh import topics
from civicmesh.config import load_settings
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import GENESIS_HASH, Reading, SignedBatch, make_payload, seal_batch
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry, RegistryFile
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
    def __init__(self, tmp_path: Path, url: str) -> None:
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
        self.store: Store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        self.store.migrate()
        tag = self.gw.key_id
        settings = load_settings(
            AnalyticsSettings, None, {"registry_file": str(path), "mqtt": {"url": url}}
        )
        self.ingest_link = MqttLink(url, f"t-ingest-{tag}", manual_ack=True)
        self.ingest = IngestWorker(settings, self.store, RegistryFile(path), self.ingest_link, tag)
        self.ingest.start()
        self.ingest_link.wait_connected(10)
        gw_settings = load_settings(
            GatewaySettings,
            None,
            {"registry_file": str(path), "state_dir": str(tmp_path / "gw"), "key_file": "x"},
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
    rig.publish(rig.device.key_id, batches[0].message)  # replayed seq
    rig.publish(rig.other.key_id, batches[2].message)  # right device's batch, wrong topic

    expected = sorted(
        [
            "decode.malformed",
            "signature.invalid",
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
    assert stats["quarantined_by_reason"]["chain.replay"] == 1
    assert stats["backlog"] == 0


def test_chain_heads_survive_a_gateway_restart(tmp_path: Path) -> None:
    from gateway.buffer import GatewayBuffer

    buffer = GatewayBuffer(tmp_path / "b.db")
    buffer.accept("aaaaaaaaaaaaaaaa", 3, b"h" * 32, "t", b"env")
    buffer.close()
    reopened = GatewayBuffer(tmp_path / "b.db")
    head = reopened.head("aaaaaaaaaaaaaaaa")
    assert head is not None and head.seq == 3 and head.hash == b"h" * 32
    assert [(t, b) for _, t, b in reopened.pending(10)] == [("t", b"env")]
    reopened.close()
