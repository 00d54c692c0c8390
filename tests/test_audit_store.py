"""The audit log in the central store: leaves in the batch's own transaction, every backend."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from support import PostgresUnavailable, create_database, drop_database, tsdb_admin_url

from analytics.store import Store, StoreError, open_store
from analytics.store.base import StoredBatch
from civicmesh.audit.example import leaf_of, log_signer, simulate_envelopes
from civicmesh.audit.log import Mirror, make_checkpoint
from civicmesh.audit.merkle import (
    inclusion_proof,
    leaf_hash,
    root_hash,
    root_of,
    verify_inclusion,
)
from civicmesh.audit.tiles import FolderSource
from civicmesh.audit.verify import Trust, Verifier
from civicmesh.protocol import Reading, open_batch, open_envelope
from civicmesh.registry import Registry

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def stored(envelope: bytes, registry: Registry, *, bad_value: bool = False) -> StoredBatch:
    opened = open_envelope(envelope, registry.gateway_key)
    batch = open_batch(opened.device_message, registry.device_key)
    readings = batch.payload.readings
    if bad_value:  # the store refuses NaN: the whole write rolls back
        r = readings[0]
        readings = (Reading(r.ts_ms, r.metric, math.nan), *readings[1:])
    return StoredBatch(
        device_id=batch.device_id,
        seq=batch.seq,
        payload_hash=batch.hash,
        prev_hash=batch.payload.prev_hash,
        sealed_at_ms=batch.payload.sealed_at_ms,
        model_version=batch.payload.model_version,
        gateway_id=opened.gateway_id,
        received_at_ms=opened.received_at_ms,
        ingested_at_ms=opened.received_at_ms + 10,
        device_message=opened.device_message,
        gateway_message=envelope,
        readings=readings,
    )


def _schema(database: str) -> str:
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    return f"{database}?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="module")
def tsdb_database() -> Iterator[str]:
    """A database on the TimescaleDB test server (tests/support/postgres.py)."""
    try:
        server = tsdb_admin_url()
        url = create_database(server)
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        drop_database(url, server)


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
    if request.param == "timescaledb":
        return _schema(request.getfixturevalue("tsdb_database"))
    return _schema(request.getfixturevalue("pg_database"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def city() -> tuple[Registry, list[bytes]]:
    return simulate_envelopes(devices=4, batches_per_device=80, readings_per_batch=3)


def test_leaves_follow_the_ledger_and_the_store_serves_a_verifiable_mirror(
    store: Store, city: tuple[Registry, list[bytes]], tmp_path: Path
) -> None:
    registry, envelopes = city
    assert store.backend in ("sqlite", "postgresql", "timescaledb")
    batches = [stored(e, registry) for e in envelopes]
    store.write_batches(batches[:100])
    store.write_batches(batches[90:])  # ten duplicates: no second leaf for them
    assert store.audit.size() == len(envelopes) == 320
    # Ledger order: write by write, and within one write by (device, seq) (the store's
    # lock order), so each device's seqs increase along the log.
    by_key = {(b.device_id, b.seq): b.gateway_message for b in batches}
    order = [
        by_key[k] for k in sorted(by_key) if k in {(b.device_id, b.seq) for b in batches[:100]}
    ]
    order += [by_key[k] for k in sorted(by_key) if by_key[k] not in order]
    assert store.audit.entries(0, 320) == order
    expected = root_of(leaf_hash(leaf_of(e, registry)) for e in order)
    assert root_hash(store.audit, 320) == expected
    target = stored(order[201], registry)
    assert store.audit.leaf_index(target.device_id, target.seq) == 201
    proof = inclusion_proof(store.audit, 201, 320)
    verify_inclusion(201, 320, leaf_hash(leaf_of(order[201], registry)), proof, expected)
    signer = log_signer()
    note = make_checkpoint(signer, store.audit, 320)
    store.audit.save_checkpoint(320, note, 1)
    assert store.audit.latest_checkpoint() == (320, note)
    Mirror(tmp_path / "mirror").publish(store.audit, 320, note, store.audit.entries)
    report = Verifier(FolderSource(tmp_path / "mirror"), Trust(signer.key, registry)).run()
    assert report.ok, "\n".join(report.lines())


def test_a_failed_batch_write_adds_no_leaf(
    store: Store, city: tuple[Registry, list[bytes]]
) -> None:
    registry, envelopes = city
    store.write_batches([stored(e, registry) for e in envelopes[:10]])
    with pytest.raises(StoreError):
        store.write_batches(
            [stored(envelopes[10], registry), stored(envelopes[11], registry, bad_value=True)]
        )
    assert store.audit.size() == 10  # neither the good nor the bad batch of that write
    store.write_batches([stored(e, registry) for e in envelopes[10:20]])  # cache stays right
    logged = store.audit.entries(0, 20)
    assert sorted(logged) == sorted(envelopes[:20])
    assert root_hash(store.audit, 20) == root_of(leaf_hash(leaf_of(e, registry)) for e in logged)


def test_two_writers_share_one_dense_log(
    store_url: str, city: tuple[Registry, list[bytes]]
) -> None:
    registry, envelopes = city
    first, second = open_store(store_url), open_store(store_url)
    first.migrate()
    second.migrate()  # also decides its path (TimescaleDB or not)
    try:
        for i in range(0, 60, 5):  # alternate writers: each must notice the other's appends
            (first if i % 10 else second).write_batches(
                [stored(e, registry) for e in envelopes[i : i + 5]]
            )
        assert first.audit.size() == second.audit.size() == 60
        logged = first.audit.entries(0, 60)
        assert sorted(logged) == sorted(envelopes[:60])
        assert root_hash(second.audit, 60) == root_of(
            leaf_hash(leaf_of(e, registry)) for e in logged
        )
    finally:
        first.close()
        second.close()


def test_batches_stored_before_the_log_are_backfilled(
    store: Store, city: tuple[Registry, list[bytes]]
) -> None:
    registry, envelopes = city
    store.audit.enabled = False
    store.write_batches([stored(e, registry) for e in envelopes[:30]])
    store.audit.enabled = True
    assert store.audit.size() == 0
    assert store.audit.backfill(batch_size=7) == 30
    store.write_batches([stored(e, registry) for e in envelopes[30:40]])
    assert store.audit.size() == 40
    assert sorted(store.audit.entries(0, 40)) == sorted(envelopes[:40])


def test_a_batch_back_after_the_ledger_lost_it_keeps_its_one_leaf(
    store: Store, city: tuple[Registry, list[bytes]], store_url: str
) -> None:
    """A replay after a store loss (or a restore) re-inserts batches whose leaves exist."""
    registry, envelopes = city
    store.write_batches([stored(e, registry) for e in envelopes[:20]])
    before = root_hash(store.audit, 20)
    if store_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DELETE FROM batches WHERE seq <= 3")
    else:
        with psycopg.connect(store_url) as conn:
            conn.execute(b"DELETE FROM batches WHERE seq <= 3")
    store.write_batches([stored(e, registry) for e in envelopes[:24]])  # 12 back, 4 new
    assert store.audit.size() == 24
    assert root_hash(store.audit, 20) == before
