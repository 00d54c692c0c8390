"""The shipped TLS broker configuration, run for real: client certificates from
``civicmesh pki`` and the ACL generated from the registry.

Mosquitto runs ``deploy/mosquitto/civicmesh-tls.conf`` with only its paths and port
substituted (tests/support/mosquitto.py).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import MosquittoProcess

from civicmesh import topics
from civicmesh.errors import MqttError
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import Message, MqttLink
from civicmesh.pki import PkiError, acl, init_ca, issue, revoked_names, write_crl
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry

TLS_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "civicmesh-tls.conf"
pytestmark = pytest.mark.integration


@dataclass
class Site:
    broker: MosquittoProcess
    pki: Path
    a: Ed25519Signer
    b: Ed25519Signer
    gw: Ed25519Signer

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def link(self, name: str, pki: Path | None = None) -> MqttLink:
        where = pki or self.pki
        return MqttLink(
            self.url,
            f"t-{name[:20]}-{os.getpid()}",
            tls_ca=str(self.pki / "ca.crt"),
            tls_cert=str(where / f"{name}.crt"),
            tls_key=str(where / f"{name}.key"),
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    pki = tmp_path / "pki"
    init_ca(pki)
    issue(pki, "broker", server=True, hosts=("127.0.0.1", "localhost"))
    a, b, gw = (Ed25519Signer.generate() for _ in range(3))
    registry = (
        Registry.empty()
        .with_device(DeviceRecord(a.key_id, a.verify_key().to_text(), "z1"))
        .with_device(DeviceRecord(b.key_id, b.verify_key().to_text(), "z1"))
        .with_gateway(GatewayRecord(gw.key_id, gw.verify_key().to_text()))
    )
    for name in (a.key_id, b.key_id, f"gw-{gw.key_id}", "ingest-central"):
        issue(pki, name, server=False)
    acl_path = tmp_path / "mosquitto.acl"
    acl_path.write_text(acl(registry))
    broker = MosquittoProcess(
        TLS_CONFIG,
        workdir=tmp_path / "broker",
        substitutions={
            "/etc/civicmesh/pki/": f"{pki}/",
            "/etc/civicmesh/mosquitto.acl": str(acl_path),
        },
    )
    broker.start()
    try:
        yield Site(broker, pki, a, b, gw)
    finally:
        broker.close()


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def payloads(self) -> set[bytes]:
        with self.lock:
            return {p for _, p in self.messages}


def settle(inbox: Inbox, expected: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while expected not in inbox.payloads():
        assert time.monotonic() < deadline, f"{expected!r} never arrived"
        time.sleep(0.05)
    time.sleep(0.5)  # anything that was going to arrive with it has


def test_a_device_publishes_only_as_itself_and_reads_only_its_own(site: Site) -> None:
    gateway, dev_a, dev_b = (
        site.link(n) for n in (f"gw-{site.gw.key_id}", site.a.key_id, site.b.key_id)
    )
    uplinks, b_receipts, a_receipts = Inbox(), Inbox(), Inbox()
    gateway.subscribe(topics.ALL_DEVICE_UP, uplinks)
    dev_b.subscribe(topics.device_receipt(site.b.key_id), b_receipts)
    dev_a.subscribe(topics.device_receipt(site.b.key_id), a_receipts)  # not its own
    try:
        for link in (gateway, dev_a, dev_b):
            link.connect()
        dev_a.publish(topics.device_up(site.b.key_id), b"A posing as B")
        dev_a.publish(topics.device_up(site.a.key_id), b"A as A")
        dev_b.publish(topics.device_up(site.b.key_id), b"B as B")
        settle(uplinks, b"B as B")
        settle(uplinks, b"A as A")
        assert uplinks.payloads() == {b"A as A", b"B as B"}
        gateway.publish(topics.device_receipt(site.b.key_id), b"receipt for B")
        settle(b_receipts, b"receipt for B")
        assert a_receipts.payloads() == set()
        # a device cannot pose as its gateway either
        upstream = Inbox()
        ingest = site.link("ingest-central")
        ingest.subscribe(topics.ALL_GATEWAY_UP, upstream)
        ingest.connect()
        try:
            dev_a.publish(topics.gateway_up(site.gw.key_id), b"A posing as the gateway")
            gateway.publish(topics.gateway_up(site.gw.key_id), b"the gateway")
            settle(upstream, b"the gateway")
            assert upstream.payloads() == {b"the gateway"}
        finally:
            ingest.close()
    finally:
        for link in (gateway, dev_a, dev_b):
            link.close()


def test_clients_without_a_certificate_of_the_site_are_refused(site: Site, tmp_path: Path) -> None:
    bare = MqttLink(site.url, "t-bare", tls_ca=str(site.pki / "ca.crt"), protocol="5")
    with pytest.raises(MqttError):
        bare.connect(timeout=3)
    bare.close()
    other = tmp_path / "other-ca"
    init_ca(other, "someone else's CA")
    issue(other, site.a.key_id, server=False)
    forged = site.link(site.a.key_id, pki=other)
    with pytest.raises(MqttError):
        forged.connect(timeout=3)
    forged.close()
    plain = MqttLink(f"mqtt://127.0.0.1:{site.broker.port}", "t-plain", protocol="5")
    with pytest.raises(MqttError):
        plain.connect(timeout=3)
    plain.close()


def test_pki_keys_are_private_and_names_checked(tmp_path: Path) -> None:
    init_ca(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(PkiError, match="exists"):
        init_ca(tmp_path)
    key, _ = issue(tmp_path, "ingest-central", server=False)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(PkiError, match="device id"):
        issue(tmp_path, "+/#", server=False)


def test_over_tls_revocation_and_rotation_reach_gateway_and_ingest(
    site: Site, tmp_path: Path
) -> None:
    """The whole path on the TLS broker, every client with its own certificate: a device's
    batches stored; after a rotation the new key works and the old one stops after the
    window; a revoked device's batches are quarantined."""
    from dataclasses import replace

    from analytics.ingest import IngestWorker
    from analytics.settings import AnalyticsSettings
    from analytics.store import open_store
    from civicmesh.config import load_settings
    from civicmesh.identity import BoundSigner
    from civicmesh.protocol import GENESIS_HASH, Reading, encode_rotation, make_payload, seal_batch
    from civicmesh.registry import RegistryFile
    from civicmesh.timeutil import now_ms
    from gateway.relay import Gateway
    from gateway.settings import GatewaySettings

    registry_path = tmp_path / "registry.json"
    Registry.empty().with_device(
        DeviceRecord(site.a.key_id, site.a.verify_key().to_text(), "z1")
    ).with_gateway(GatewayRecord(site.gw.key_id, site.gw.verify_key().to_text())).save(
        registry_path
    )
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    tls = {"tls_ca": str(site.pki / "ca.crt")}
    settings = load_settings(
        AnalyticsSettings,
        None,
        {
            "registry_file": str(registry_path),
            "mqtt": {
                "url": site.url,
                **tls,
                "tls_cert": str(site.pki / "ingest-central.crt"),
                "tls_key": str(site.pki / "ingest-central.key"),
            },
        },
    )
    ingest_link = MqttLink(
        site.url, "t-ingest-tls", manual_ack=True, protocol="5", **settings.mqtt.tls_args()
    )
    ingest = IngestWorker(settings, store, RegistryFile(registry_path), ingest_link, "tls")
    gw_name = f"gw-{site.gw.key_id}"
    gw_settings = load_settings(
        GatewaySettings,
        None,
        {
            "registry_file": str(registry_path),
            "state_dir": str(tmp_path / "gw"),
            "key_file": "x",
        },
    )
    dev_link = site.link(gw_name)
    up_link = MqttLink(
        site.url,
        "t-gw-up-tls",
        protocol="5",
        tls_ca=tls["tls_ca"],
        tls_cert=str(site.pki / f"{gw_name}.crt"),
        tls_key=str(site.pki / f"{gw_name}.key"),
    )
    gateway = Gateway(gw_settings, site.gw, RegistryFile(registry_path), dev_link, up_link)
    device = site.link(site.a.key_id)

    def seqs() -> list[int]:
        return [e.seq for e in store.ledger(site.a.key_id)]

    def wait(predicate: Any, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.05)

    def batch(signer: Any, seq: int, prev: bytes) -> Any:
        reading = Reading(1_750_000_000_000 + seq * 60_000, "no2", 20.0 + seq)
        return seal_batch(
            signer, make_payload(site.a.key_id, seq, prev, 1_750_000_000_000, [reading])
        )

    try:
        ingest.start()
        gateway.start()
        up_link.connect()
        dev_link.connect()
        device.connect()
        first = batch(site.a, 1, GENESIS_HASH)
        device.publish(topics.device_up(site.a.key_id), first.message)
        wait(lambda: seqs() == [1])
        # rotation: announced by the current key, applied by the operator
        new_key = Ed25519Signer.generate()
        announcement = encode_rotation(site.a, new_key.public_key, now_ms())
        rotated, _ = Registry.load(registry_path).rotate_device_key(
            announcement, 3_600_000, now_ms()
        )
        rotated.save(registry_path)
        bound = BoundSigner(new_key, site.a.key_id)
        second = batch(bound, 2, first.hash)
        device.publish(topics.device_up(site.a.key_id), second.message)
        wait(lambda: seqs() == [1, 2])
        record = Registry.load(registry_path).devices[site.a.key_id]
        Registry.load(registry_path).with_device(
            replace(record, previous_key_until_ms=now_ms() - 1)
        ).save(registry_path)
        stale = batch(site.a, 3, second.hash)  # the old key, after the window
        device.publish(topics.device_up(site.a.key_id), stale.message)
        wait(lambda: any(r.reason == "signature.invalid" for r in store.quarantined(100)))
        third = batch(bound, 3, second.hash)
        device.publish(topics.device_up(site.a.key_id), third.message)
        wait(lambda: seqs() == [1, 2, 3])
        # revocation: from the next batch on, quarantined
        Registry.load(registry_path).revoke_device(site.a.key_id).save(registry_path)
        device.publish(topics.device_up(site.a.key_id), batch(bound, 4, third.hash).message)
        wait(lambda: any(r.reason == "signature.unknown_signer" for r in store.quarantined(100)))
        assert seqs() == [1, 2, 3]
    finally:
        device.close()
        dev_link.close()
        gateway.stop()
        up_link.close()
        ingest.stop()
        ingest_link.close()
        store.close()


def test_a_revoked_device_matches_no_acl_rule_and_its_certificate_is_refused(
    site: Site, tmp_path: Path
) -> None:
    """Issue 16 item 15: revoked devices still matched the ACL's patterns; no CRL."""
    from dataclasses import replace

    registry = (
        Registry.empty()
        .with_device(DeviceRecord(site.a.key_id, site.a.verify_key().to_text(), "z1"))
        .with_device(DeviceRecord(site.b.key_id, site.b.verify_key().to_text(), "z1"))
    )
    revoked = registry.with_device(replace(registry.devices[site.b.key_id], status="revoked"))
    text = acl(revoked)
    assert f"user {site.a.key_id}" in text and "\npattern " not in text
    assert f"user {site.b.key_id}" not in text, "no rule for the revoked device"
    write_crl(site.pki, revoked_names(revoked))
    (tmp_path / "mosquitto.acl").write_text(text)
    site.broker.close()
    broker = MosquittoProcess(
        TLS_CONFIG,
        workdir=tmp_path / "broker-after",
        substitutions={
            "/etc/civicmesh/pki/": f"{site.pki}/",
            "/etc/civicmesh/mosquitto.acl": str(tmp_path / "mosquitto.acl"),
        },
    )
    broker.start()
    try:
        after = Site(broker, site.pki, site.a, site.b, site.gw)
        good = after.link(site.a.key_id)
        good.connect(timeout=5)
        good.close()
        gone = after.link(site.b.key_id)
        with pytest.raises(MqttError):
            gone.connect(timeout=3)
        gone.close()
    finally:
        broker.close()
