"""Witnessing end to end on a real broker: the central's audit loop publishes retained
checkpoints, two gateway-side witness daemons fetch proofs over the public API, cosign
over MQTT, and a forked checkpoint raises an alert."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from support import MosquittoProcess, free_port, wait_for_port
from test_audit_store import stored

from analytics.api import create_app
from analytics.audit import AuditLoop, AuditPublisher
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.audit import ALERT_FILTER, CHECKPOINT_TOPIC
from civicmesh.audit.daemon import WitnessDaemon
from civicmesh.audit.example import log_signer, simulate_envelopes, witness_signer
from civicmesh.audit.merkle import MemoryHashStore, TreeAppender, root_hash
from civicmesh.audit.note import Checkpoint, sign_checkpoint
from civicmesh.audit.tiles import FolderSource, HttpSource
from civicmesh.audit.verify import Trust, Verifier
from civicmesh.audit.witness import Witness
from civicmesh.mqtt import MqttLink
from civicmesh.registry import Registry

pytestmark = pytest.mark.integration


@dataclass
class Central:
    api: str
    store: Store
    registry: Registry
    envelopes: list[bytes]
    loop: AuditLoop
    mirror: Path


@pytest.fixture
def central(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[Central]:
    registry, envelopes = simulate_envelopes(devices=4, batches_per_device=50, readings_per_batch=2)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.write_batches([stored(e, registry) for e in envelopes[:120]])
    publisher = AuditPublisher(
        store, log_signer(), interval_s=1, witnesses=[witness_signer(0).key, witness_signer(1).key]
    )
    app = create_app(store)
    app.state.audit_publisher = publisher
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for_port(port, 20)
    link = MqttLink(mosquitto.url, "central-audit")
    loop = AuditLoop(publisher, link, tmp_path / "mirror", tick_s=0.2)
    loop.start()
    yield Central(
        f"http://127.0.0.1:{port}/api/v1/audit",
        store,
        registry,
        envelopes,
        loop,
        tmp_path / "mirror",
    )
    loop.stop()
    link.close()
    server.should_exit = True
    thread.join(10)
    store.close()


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_gateways_witness_the_central_log_and_catch_a_fork(
    central: Central, mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    key = log_signer().key
    links, daemons = [], []
    for i in range(2):
        link = MqttLink(mosquitto.url, f"gateway-{i}")
        link.connect()
        daemon = WitnessDaemon(
            Witness(witness_signer(i), key, tmp_path / f"w{i}.json"), link, central.api
        )
        daemon.start()
        links.append(link)
        daemons.append(daemon)
    alerts: list[bytes] = []
    watcher = MqttLink(mosquitto.url, "alert-watcher")
    watcher.subscribe(ALERT_FILTER, lambda m: alerts.append(m.payload))
    watcher.connect()
    try:

        def witnessed(size: int) -> bool:
            current = central.loop.publisher.current()
            return current is not None and current.size == size and len(current.cosigned_by) == 2

        assert _wait(lambda: witnessed(120)), central.loop.publisher.current()
        trust = Trust(key, central.registry, (witness_signer(0).key, witness_signer(1).key), 2)
        report = Verifier(HttpSource(central.api), trust).run()
        assert report.ok, "\n".join(report.lines())
        # The mirror folder is written by the loop right after it stores a cosignature.
        assert _wait(lambda: Verifier(FolderSource(central.mirror), trust).run().ok)
        # The log grows: the next checkpoint is witnessed too (consistency checked).
        central.store.write_batches([stored(e, central.registry) for e in central.envelopes[120:]])
        assert _wait(lambda: witnessed(200))
        assert all(d.cosigned == 2 for d in daemons)
        # A dishonest central shows another tree of the same size: both witnesses refuse.
        fork = MemoryHashStore()
        fork.write_nodes(TreeAppender().extend(bytes([i % 256]) * 32 for i in range(200)))
        forged = sign_checkpoint(Checkpoint(key.name, 200, root_hash(fork, 200)), log_signer())
        links[0].publish(CHECKPOINT_TOPIC, forged, retain=True)
        assert _wait(lambda: len(alerts) >= 2), alerts
        assert b"split view" in alerts[0] and forged in alerts[0]
        assert all(d.alerts == 1 for d in daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
        for link in (*links, watcher):
            link.close()
