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

import pytest
from support import MosquittoProcess

from civicmesh import topics
from civicmesh.errors import MqttError
from civicmesh.identity import Ed25519Signer
from civicmesh.mqtt import Message, MqttLink
from civicmesh.pki import PkiError, acl, init_ca, issue
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
