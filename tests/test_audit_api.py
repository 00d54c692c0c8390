"""The central audit service: checkpoints on a schedule, witnesses cosigning over the
public API (a real HTTP server), proofs, and ``audit verify`` against the API itself."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from support import free_port, wait_for_port
from test_audit_store import stored

from analytics.api import create_app
from analytics.audit import AuditPublisher
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.audit import CHECKPOINT_TOPIC, AuditError
from civicmesh.audit.example import leaf_of, log_signer, simulate_envelopes, witness_signer
from civicmesh.audit.merkle import (
    consistency_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from civicmesh.audit.note import ALG_COSIGNATURE_V1, NoteSigner, open_checkpoint
from civicmesh.audit.tiles import HttpSource, TileHashStore
from civicmesh.audit.verify import Trust, Verifier
from civicmesh.audit.witness import Witness, cosignature_message
from civicmesh.registry import Registry


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Service:
    url: str
    store: Store
    registry: Registry
    envelopes: list[bytes]
    publisher: AuditPublisher
    clock: Clock
    published: list[tuple[str, bytes, bool]]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    registry, envelopes = simulate_envelopes(
        devices=3, batches_per_device=120, readings_per_batch=2
    )
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    published: list[tuple[str, bytes, bool]] = []
    clock = Clock(1_767_225_600.0 + 3600)
    publisher = AuditPublisher(
        store,
        log_signer(),
        interval_s=10,
        witnesses=[witness_signer(0).key, witness_signer(1).key],
        publish=lambda topic, payload, retain: published.append((topic, payload, retain)),
        clock=clock,
    )
    app = create_app(store)
    app.state.audit_publisher = publisher
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for_port(port, 20)
    yield Service(
        f"http://127.0.0.1:{port}", store, registry, envelopes, publisher, clock, published
    )
    server.should_exit = True
    thread.join(10)
    store.close()


def _write(service: Service, lo: int, hi: int) -> None:
    for i in range(lo, hi, 50):
        service.store.write_batches(
            [stored(e, service.registry) for e in service.envelopes[i : min(hi, i + 50)]]
        )


def test_checkpoints_on_schedule_and_day_close(service: Service) -> None:
    _write(service, 0, 100)
    first = service.publisher.tick()
    assert first is not None and first.size == 100
    assert service.published[-1] == (CHECKPOINT_TOPIC, first.note, True)  # retained
    _write(service, 100, 150)
    service.clock.t += 5
    assert service.publisher.tick() is None  # grown, but within the interval
    service.clock.t += 5
    assert service.publisher.tick().size == 150  # type: ignore[union-attr]
    service.clock.t = (service.clock.t // 86_400 + 1) * 86_400 + 1  # the next UTC day
    closing = service.publisher.tick()
    assert closing is not None and closing.size == 150  # a checkpoint at day close, even quiet


def test_witnesses_cosign_over_http_and_verify_passes_against_the_api(
    service: Service, tmp_path: Path
) -> None:
    _write(service, 0, 200)
    service.publisher.tick()
    source = HttpSource(f"{service.url}/api/v1/audit")
    key = log_signer().key
    witnesses = []
    for i in range(2):
        witness = Witness(witness_signer(i), key, tmp_path / f"w{i}.json")
        note = source.get("checkpoint")
        size = open_checkpoint(note, key).checkpoint.size
        cosig = witness.cosign(note, lambda m, n: consistency_proof(TileHashStore(source, n), m, n))
        service.publisher.add_cosignature(cosignature_message(size, cosig))
        witnesses.append(witness)
    opened = open_checkpoint(source.get("checkpoint"), key, [w.signer.key for w in witnesses], 2)
    assert opened.checkpoint.size == 200
    assert service.published[-1][1] == source.get("checkpoint")  # republished, retained
    trust = Trust(key, service.registry, tuple(w.signer.key for w in witnesses), 2)
    report = Verifier(source, trust).run()
    assert report.ok, "\n".join(report.lines())
    assert report.checked_to == 200 and report.devices == 3
    # The log grows; a witness checks the new checkpoint against the one it cosigned.
    _write(service, 200, 300)
    service.clock.t += 10
    service.publisher.tick()
    note = source.get("checkpoint")
    witnesses[0].cosign(note, lambda m, n: consistency_proof(TileHashStore(source, n), m, n))
    stranger = NoteSigner.generate("stranger.example/w", ALG_COSIGNATURE_V1)
    bad = Witness(stranger, key).cosign(
        note, lambda m, n: consistency_proof(TileHashStore(source, n), m, n)
    )
    with pytest.raises(AuditError) as err:
        service.publisher.add_cosignature(cosignature_message(300, bad))
    assert err.value.reason == "cosignature.unknown"
    forged = cosignature_message(300, bad).replace(b"stranger.example/w", b"witness.example/w1")
    with pytest.raises(AuditError) as err:
        service.publisher.add_cosignature(forged)
    assert err.value.reason == "cosignature.invalid"


def test_proof_endpoints(service: Service) -> None:
    _write(service, 0, 150)
    service.publisher.tick()
    client = TestClient(create_app(service.store))
    first = service.store.audit.latest_checkpoint()
    assert first is not None
    key = log_signer().key
    target = stored(service.store.audit.entries(77, 78)[0], service.registry)
    body = client.get(
        "/api/v1/audit/proof/inclusion", params={"device": target.device_id, "seq": target.seq}
    ).json()
    assert (body["index"], body["size"]) == (77, 150)
    root = open_checkpoint(body["checkpoint"].encode(), key).checkpoint.root
    leaf = leaf_hash(leaf_of(target.gateway_message, service.registry))
    verify_inclusion(77, 150, leaf, [base64.b64decode(p) for p in body["proof"]], root)
    missing = client.get("/api/v1/audit/proof/inclusion", params={"device": "a" * 16, "seq": 1})
    assert missing.status_code == 404 and "not in the audit log" in missing.json()["detail"]
    _write(service, 150, 230)
    service.clock.t += 10
    service.publisher.tick()
    second = service.store.audit.latest_checkpoint()
    assert second is not None
    cons = client.get("/api/v1/audit/proof/consistency", params={"from": 150, "to": 230}).json()
    verify_consistency(
        150,
        root,
        230,
        open_checkpoint(second[1], key).checkpoint.root,
        [base64.b64decode(p) for p in cons["proof"]],
    )
    assert (
        client.get("/api/v1/audit/proof/consistency", params={"from": 9, "to": 999}).status_code
        == 422
    )
    assert client.get("/api/v1/audit/tile/0/000.p/255").status_code == 404  # beyond the log
    assert client.get("/api/v1/audit/tile/../../etc/passwd").status_code == 404


def test_fact_sheets_cite_the_checkpoint_they_were_computed_at(service: Service) -> None:
    from analytics.reports.facts import build_fact_sheet
    from civicmesh.audit.example import START_MS

    day = (START_MS, START_MS + 86_400_000)
    assert build_fact_sheet(service.store, *day).checkpoint is None  # no checkpoint yet
    _write(service, 0, 90)
    published = service.publisher.tick()
    assert published is not None
    sheet = build_fact_sheet(service.store, *day)
    root = open_checkpoint(published.note, log_signer().key).checkpoint.root
    assert sheet.checkpoint == (90, base64.b64encode(root).decode())
    assert sheet.to_dict()["ledger"]["checkpoint"] == {"size": 90, "root": sheet.checkpoint[1]}
