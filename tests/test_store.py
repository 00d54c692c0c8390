"""Storage backends: migrations, exact round trips, idempotency, atomicity, queries.

Every behavioural test runs on every backend: SQLite in ``tmp_path``, plain PostgreSQL
and the TimescaleDB path on a real TimescaleDB server, each in a throw-away database
(``civicmesh_test_<random>``, one per session and server; one schema per test).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support import (
    PostgresUnavailable,
    admin_url,
    create_database,
    drop_database,
    quiet_policy,
    tsdb_admin_url,
)

from analytics.store import open_store
from analytics.store.base import (
    DeviceStatus,
    SeriesPoint,
    StoragePolicy,
    Store,
    StoredBatch,
    StoreError,
    WriteOutcome,
    ZoneSummary,
)
from analytics.store.postgres import PostgresStore, partition_name, partition_start
from analytics.store.sqlite import SqliteStore
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord

T0 = 1_699_999_800_000  # a multiple of 300 s: 5-minute buckets start exactly here
MIN = 60_000
DAY = 24 * 3600 * 1000

DEVICE_A = Ed25519Signer.from_seed(hashlib.sha256(b"store/a").digest())
DEVICE_B = Ed25519Signer.from_seed(hashlib.sha256(b"store/b").digest())
DEVICE_C = Ed25519Signer.from_seed(hashlib.sha256(b"store/c").digest())
DEVICE_D = Ed25519Signer.from_seed(hashlib.sha256(b"store/d").digest())
GATEWAY = Ed25519Signer.from_seed(hashlib.sha256(b"store/gw").digest())


def sealed(
    signer: Ed25519Signer,
    seq: int,
    readings: Sequence[Reading],
    *,
    prev_hash: bytes = GENESIS_HASH,
    sealed_at_ms: int | None = None,
    model_version: str = "cal-1",
) -> StoredBatch:
    """A StoredBatch made the way ingest makes it: from a really sealed, relayed batch."""
    sealed_at = sealed_at_ms if sealed_at_ms is not None else T0 + seq * MIN
    payload = make_payload(signer.key_id, seq, prev_hash, sealed_at, readings, model_version)
    batch = seal_batch(signer, payload)
    envelope = wrap_envelope(GATEWAY, batch.message, sealed_at + 1_500)
    return StoredBatch(
        device_id=batch.device_id,
        seq=batch.seq,
        payload_hash=batch.hash,
        prev_hash=prev_hash,
        sealed_at_ms=sealed_at,
        model_version=model_version,
        gateway_id=GATEWAY.key_id,
        received_at_ms=envelope.received_at_ms,
        ingested_at_ms=sealed_at + 2_750,
        device_message=batch.message,
        gateway_message=envelope.message,
        readings=batch.payload.readings,
    )


def device(signer: Ed25519Signer, zone: str, lat: float | None = None, lon: float | None = None,
           kind: str = "air") -> DeviceRecord:  # fmt: skip
    return DeviceRecord(signer.key_id, signer.verify_key().to_text(), zone, lat, lon, kind)


# ----------------------------------------------------------------------------- fixtures


# Stores on the TimescaleDB test server: no retention and no compression jobs (see
# support.quiet_policy); the policy tests set their own.
QUIET_POLICY = quiet_policy()

# The backends every store-level test runs on: the embedded store, plain PostgreSQL (the
# server on 5432) and the TimescaleDB path (the private TimescaleDB test server).
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.integration),
    pytest.param("timescaledb", marks=[pytest.mark.integration, pytest.mark.timescaledb]),
]
SQL_BACKENDS = BACKENDS[1:]


@dataclass
class Backend:
    """How to open (and peek into) one fresh, empty store."""

    name: str
    url: str

    def open(self, policy: StoragePolicy | None = None) -> Store:
        if self.name == "postgresql":
            return open_store(self.url, timescaledb="off")
        if self.name == "timescaledb":
            return open_store(self.url, timescaledb="require", policy=policy or QUIET_POLICY)
        return open_store(self.url)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Raw SQL, bypassing the store: checks what is really on disk."""
        if self.name == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                return conn.execute(sql).fetchall()
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql.encode()).fetchall()


def _session_database(server_url: Callable[[], str]) -> Iterator[str]:
    """A database on the server ``server_url()`` names; a missing server fails the test
    and says how to get one."""
    try:
        server = server_url()
        url = create_database(server)
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        drop_database(url, server)


@pytest.fixture(scope="session")
def pg_session_database() -> Iterator[str]:
    """A throw-away database on the plain PostgreSQL test server for this session."""
    yield from _session_database(admin_url)


@pytest.fixture(scope="session")
def tsdb_session_database() -> Iterator[str]:
    """A throw-away database on the TimescaleDB test server for this session."""
    yield from _session_database(tsdb_admin_url)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request, tmp_path)


@pytest.fixture(params=SQL_BACKENDS)
def sql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request, tmp_path)


def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'store.db'}")
    database = request.getfixturevalue(
        "tsdb_session_database" if request.param == "timescaledb" else "pg_session_database"
    )
    backend = Backend(request.param, fresh_schema(database))
    if request.param == "timescaledb":
        request.addfinalizer(lambda: unschedule_jobs(backend.url))
    return backend


def unschedule_jobs(url: str) -> None:
    """Stop the TimescaleDB jobs of a finished test's schema: a session's hundreds of
    schemas would otherwise keep the server's background workers busy refreshing them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT public.alter_job(job_id, scheduled => false)"
            " FROM timescaledb_information.jobs WHERE hypertable_schema = current_schema()"
        )


def fresh_schema(database: str) -> str:
    """URL of a new empty schema in ``database``: each test gets its own, through
    search_path, which is much cheaper than a database per test. On TimescaleDB the
    extension is in ``public``, not on that search path: the store must qualify it."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    return f"{database}?options=-csearch_path%3D{schema}"


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    opened = backend.open()
    opened.migrate()
    yield opened
    opened.close()


# ------------------------------------------------------------------------------- tests


def test_open_store_picks_backend_by_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/rel.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == Path("data/rel.db")
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")  # sqlite:////tmp/...
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == tmp_path / "abs.db"
    assert isinstance(open_store("postgresql://postgres@127.0.0.1/x"), PostgresStore)
    with pytest.raises(StoreError, match=r"sqlite:///.*postgresql://"):
        open_store("mysql://db/x")
    with pytest.raises(StoreError, match="names no database file"):
        open_store("sqlite:///")


def test_migrations_recorded_and_idempotent(backend: Backend) -> None:
    first = backend.open()
    assert first.migrate() == [
        "0001_initial",
        "0002_rollups",
        "0003_lean_readings",
        "0004_c_collation",
        "0005_zone_rollups",
        "0006_reports",
        "0007_dashboard",
        "0008_audit_log",
        "0009_retention_horizons",
        "0010_sqlite_parity",
    ]
    assert first.migrate() == []
    second = backend.open()
    assert second.migrate() == []
    assert backend.query("SELECT version, name FROM schema_migrations ORDER BY version") == [
        (1, "0001_initial"),
        (2, "0002_rollups"),
        (3, "0003_lean_readings"),
        (4, "0004_c_collation"),
        (5, "0005_zone_rollups"),
        (6, "0006_reports"),
        (7, "0007_dashboard"),
        (8, "0008_audit_log"),
        (9, "0009_retention_horizons"),
        (10, "0010_sqlite_parity"),
    ]
    first.close()
    second.close()


def test_concurrent_migrate_applies_once(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def run(target: Store) -> None:
        start.wait()
        try:
            results.append(target.migrate())
        except StoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = [
        "0001_initial",
        "0002_rollups",
        "0003_lean_readings",
        "0004_c_collation",
        "0005_zone_rollups",
        "0006_reports",
        "0007_dashboard",
        "0008_audit_log",
        "0009_retention_horizons",
        "0010_sqlite_parity",
    ]
    assert sorted(results) == [[], [], [], applied]
    for s in stores:
        s.close()


def test_write_and_read_back_exact(store: Store) -> None:
    readings_a = [
        Reading(T0 + 1, "pm25", 12.345678901234567, 0, 11.5, 0.125),
        Reading(T0 + 1, "no2", 41.0, 1 | 32),
        Reading(T0 + MIN, "pm25", 1e-300, 65535, None, 0.5),
        Reading(T0 + 2 * MIN, "temperature", -12.75, 0, -13.0, None),
    ]
    a1 = sealed(DEVICE_A, 1, readings_a)
    a2 = sealed(DEVICE_A, 2, [Reading(T0 + 3 * MIN, "pm25", 3.0)], prev_hash=a1.payload_hash)
    b1 = sealed(DEVICE_B, 1, [Reading(T0 + 5, "vehicle_count", 17.0)])
    assert store.write_batches([a1, a2, b1]) == [WriteOutcome.INSERTED] * 3

    expected_a = sorted(a1.readings + a2.readings, key=lambda r: (r.ts_ms, _code(r.metric)))
    assert store.readings(DEVICE_A.key_id, T0, T0 + DAY) == expected_a
    # the end is exclusive, the start inclusive
    assert store.readings(DEVICE_A.key_id, T0 + 1, T0 + MIN) == [
        Reading(T0 + 1, "pm25", 12.345678901234567, 0, 11.5, 0.125),  # code 1
        Reading(T0 + 1, "no2", 41.0, 33),  # code 3
    ]
    assert store.readings(DEVICE_A.key_id, T0, T0 + DAY, "pm25") == [
        r for r in expected_a if r.metric == "pm25"
    ]
    assert store.readings(DEVICE_B.key_id, T0, T0 + DAY) == list(b1.readings)

    ledger = store.ledger(DEVICE_A.key_id)
    assert [(e.seq, e.readings) for e in ledger] == [(1, 4), (2, 1)]
    entry = ledger[0]
    assert entry.payload_hash == a1.payload_hash
    assert entry.prev_hash == GENESIS_HASH
    assert (entry.sealed_at_ms, entry.received_at_ms, entry.ingested_at_ms) == (
        a1.sealed_at_ms,
        a1.received_at_ms,
        a1.ingested_at_ms,
    )
    assert entry.gateway_id == GATEWAY.key_id
    assert entry.device_message == a1.device_message
    assert entry.gateway_message == a1.gateway_message
    assert store.ledger(DEVICE_A.key_id, after_seq=1)[0].payload_hash == a2.payload_hash
    assert len(store.ledger(DEVICE_A.key_id, limit=1)) == 1
    assert store.counts().batches == 3
    assert store.counts().readings == 6


def test_same_batch_twice_is_duplicate_and_stored_once(store: Store) -> None:
    first = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 5.0), Reading(T0 + MIN, "pm25", 6.0)])
    assert store.write_batches([first]) == [WriteOutcome.INSERTED]
    assert store.write_batches([first]) == [WriteOutcome.DUPLICATE]
    assert len(store.readings(DEVICE_A.key_id, T0, T0 + DAY)) == 2
    assert (store.counts().batches, store.counts().readings) == (1, 2)


def test_same_key_other_hash_is_conflict_and_original_kept(store: Store) -> None:
    original = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 5.0)])
    fork = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 500.0)])
    assert fork.payload_hash != original.payload_hash
    store.write_batches([original])
    assert store.write_batches([fork]) == [WriteOutcome.CONFLICT]
    assert store.ledger(DEVICE_A.key_id)[0].payload_hash == original.payload_hash
    assert store.readings(DEVICE_A.key_id, T0, T0 + DAY) == [Reading(T0, "pm25", 5.0)]


def test_outcomes_of_a_mixed_list_follow_its_order(store: Store) -> None:
    old = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 1.0)])
    store.write_batches([old])
    new = sealed(DEVICE_A, 2, [Reading(T0 + MIN, "pm25", 2.0)], prev_hash=old.payload_hash)
    new_fork = sealed(DEVICE_A, 2, [Reading(T0 + MIN, "pm25", 9.0)], prev_hash=old.payload_hash)
    other = sealed(DEVICE_B, 1, [Reading(T0, "o3", 80.0)])
    outcomes = store.write_batches([new, old, other, new, new_fork])
    assert outcomes == [
        WriteOutcome.INSERTED,
        WriteOutcome.DUPLICATE,
        WriteOutcome.INSERTED,
        WriteOutcome.DUPLICATE,  # repeated within the list
        WriteOutcome.CONFLICT,  # differs from the copy written a moment ago
    ]
    assert store.readings(DEVICE_A.key_id, T0, T0 + DAY) == [
        Reading(T0, "pm25", 1.0),
        Reading(T0 + MIN, "pm25", 2.0),
    ]
    assert (store.counts().batches, store.counts().readings) == (3, 3)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_failed_write_leaves_nothing_of_the_list(store: Store, bad_value: float) -> None:
    good = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 5.0)])
    other = sealed(DEVICE_B, 1, [Reading(T0, "pm25", 7.0), Reading(T0 + MIN, "pm10", 8.0)])
    # The store refuses non-finite values (a CHECK / NOT NULL constraint in both schemas);
    # the refusal comes after the ledger rows and other readings were already sent.
    poisoned = sealed(DEVICE_C, 1, [Reading(T0, "pm25", 1.0), Reading(T0 + 1, "pm25", bad_value)])
    with pytest.raises(StoreError):
        store.write_batches([good, other, poisoned])
    assert store.counts().batches == 0
    assert store.ledger(DEVICE_A.key_id) == []
    assert store.readings(DEVICE_B.key_id, T0, T0 + DAY) == []
    assert store.readings(DEVICE_C.key_id, T0, T0 + DAY) == []
    # and the store stays usable: the same good batches go in afterwards
    assert store.write_batches([good, other]) == [WriteOutcome.INSERTED] * 2
    assert store.counts().readings == 3


def _series_fixture(store: Store) -> None:
    store.upsert_devices(
        [device(DEVICE_A, "north"), device(DEVICE_B, "north"), device(DEVICE_C, "south")]
    )
    store.write_batches(
        [
            sealed(DEVICE_A, 1, [
                Reading(T0 + 10_000, "pm25", 1.0),
                Reading(T0 + 290_000, "pm25", 3.0),
                Reading(T0 + 300_000, "pm25", 10.0),
                Reading(T0 + 100_000, "no2", 999.0),  # another metric: never counted
            ]),
            sealed(DEVICE_B, 1, [Reading(T0 + 299_999, "pm25", 5.0)]),
            sealed(DEVICE_C, 1, [Reading(T0 + 900_000, "pm25", 100.0)]),
        ]
    )  # fmt: skip


def test_series_buckets_align_to_the_epoch(store: Store) -> None:
    _series_fixture(store)
    end = T0 + 1_200_000

    def points(rows: list[SeriesPoint]) -> list[tuple[Any, ...]]:
        return [(p.bucket_ms, p.count, p.mean, p.min, p.max) for p in rows]

    assert points(store.series("pm25", T0, end, 300, zone="north")) == [
        (T0, 3, pytest.approx(3.0), 1.0, 5.0),
        (T0 + 300_000, 1, 10.0, 10.0, 10.0),
    ]
    assert points(store.series("pm25", T0, end, 300)) == [
        (T0, 3, pytest.approx(3.0), 1.0, 5.0),
        (T0 + 300_000, 1, 10.0, 10.0, 10.0),
        (T0 + 900_000, 1, 100.0, 100.0, 100.0),
    ]
    assert points(store.series("pm25", T0, end, 300, device_id=DEVICE_A.key_id)) == [
        (T0, 2, 2.0, 1.0, 3.0),
        (T0 + 300_000, 1, 10.0, 10.0, 10.0),
    ]
    assert points(store.series("pm25", T0, end, 300, zone="south")) == [
        (T0 + 900_000, 1, 100.0, 100.0, 100.0)
    ]
    # A start inside a bucket filters readings but does not shift the bucket grid, and
    # the end is exclusive.
    assert points(store.series("pm25", T0 + 200_000, T0 + 300_000, 300)) == [(T0, 2, 4.0, 3.0, 5.0)]
    # Hourly: floor(T0 / 3_600_000) * 3_600_000 = 1_699_999_200_000 holds all five.
    assert points(store.series("pm25", T0, end, 3600)) == [
        (1_699_999_200_000, 5, pytest.approx(23.8), 1.0, 100.0)
    ]
    assert store.series("pm25", T0, end, 300, zone="nowhere") == []
    with pytest.raises(StoreError, match="positive"):
        store.series("pm25", T0, end, 0)
    with pytest.raises(StoreError, match="known metrics"):
        store.series("radon", T0, end, 300)


def test_latest_zones_and_devices(store: Store) -> None:
    store.upsert_devices(
        [
            device(DEVICE_A, "north", 52.0, 13.0),
            device(DEVICE_B, "north", 52.5, 13.5, kind="traffic"),
            device(DEVICE_C, "south"),
            device(DEVICE_D, "south", 51.0, 12.0),
        ]
    )
    a1 = sealed(DEVICE_A, 1, [Reading(T0, "pm25", 1.0), Reading(T0 + 5 * MIN, "pm25", 2.0, 8)])
    # seq 2 carries older readings (an outbox backfill): latest goes by time, not seq
    a2 = sealed(DEVICE_A, 2, [Reading(T0 + MIN, "pm25", 9.0), Reading(T0 + MIN, "no2", 30.0)],
                prev_hash=a1.payload_hash)  # fmt: skip
    b1 = sealed(DEVICE_B, 1, [Reading(T0 + 2 * MIN, "vehicle_count", 42.0)])
    c1 = sealed(DEVICE_C, 1, [Reading(T0 + 3 * MIN, "pm25", 20.0)])
    store.write_batches([a1, a2, b1, c1])

    latest = {
        (r.device_id, r.metric): (r.zone, r.ts_ms, r.value, r.quality) for r in store.latest()
    }
    assert latest == {
        (DEVICE_A.key_id, "pm25"): ("north", T0 + 5 * MIN, 2.0, 8),
        (DEVICE_A.key_id, "no2"): ("north", T0 + MIN, 30.0, 0),
        (DEVICE_B.key_id, "vehicle_count"): ("north", T0 + 2 * MIN, 42.0, 0),
        (DEVICE_C.key_id, "pm25"): ("south", T0 + 3 * MIN, 20.0, 0),
    }
    assert [(r.device_id, r.metric) for r in store.latest("south")] == [(DEVICE_C.key_id, "pm25")]
    assert store.latest("nowhere") == []

    zones = store.zones()
    assert [(z.zone, z.devices) for z in zones] == [("north", 2), ("south", 2)]
    assert zones[0].lat == pytest.approx(52.25) and zones[0].lon == pytest.approx(13.25)
    assert zones[1] == ZoneSummary("south", 2, 51.0, 12.0)  # C has no position

    by_id = {d.device_id: d for d in store.devices()}
    assert by_id[DEVICE_A.key_id] == DeviceStatus(
        DEVICE_A.key_id, "north", 52.0, 13.0, "air", "active", T0 + 5 * MIN, 2, 2
    )
    assert by_id[DEVICE_B.key_id].kind == "traffic"
    assert by_id[DEVICE_B.key_id].last_seen_ms == T0 + 2 * MIN
    assert by_id[DEVICE_D.key_id] == DeviceStatus(
        DEVICE_D.key_id, "south", 51.0, 12.0, "air", "active", None, None, 0
    )

    # upsert replaces what the registry says about a device
    store.upsert_devices([device(DEVICE_D, "north", 51.0, 12.0)])
    assert [(z.zone, z.devices) for z in store.zones()] == [("north", 3), ("south", 1)]


def test_quarantine_round_trip(store: Store) -> None:
    older = QuarantineRecord.of(
        reason="signature.invalid",
        detail="device batch: signature does not verify",
        source="gw:abc",
        topic="civicmesh/v1/dev/x/up",
        received_at_ms=T0,
        payload=bytes(range(256)) * 3,
        device_id=DEVICE_A.key_id,
        seq=7,
    )
    newer = QuarantineRecord.of(
        reason="decode.malformed",
        detail="not CBOR",
        source="ingest:w1",
        topic="civicmesh/v1/gw/y/up",
        received_at_ms=T0 + MIN,
        payload=b"",
    )
    store.add_quarantine([older, newer])
    assert store.quarantined() == [newer, older]
    assert store.quarantined(limit=1) == [newer]
    assert store.quarantined()[1].payload() == bytes(range(256)) * 3
    assert store.counts().quarantined == 2
    broken = QuarantineRecord(**{**_fields(newer), "payload_b64": "not base64!"})
    with pytest.raises(StoreError, match="base64"):
        store.add_quarantine([broken])
    assert store.counts().quarantined == 2


def test_one_store_shared_by_threads(store: Store) -> None:
    signers = [DEVICE_A, DEVICE_B, DEVICE_C, DEVICE_D]
    outcomes: list[WriteOutcome] = []
    errors: list[BaseException] = []

    def writer(signer: Ed25519Signer) -> None:
        prev = GENESIS_HASH
        try:
            for seq in range(1, 11):
                batch = sealed(signer, seq, [Reading(T0 + seq * MIN, "pm25", float(seq))],
                               prev_hash=prev)  # fmt: skip
                outcomes.extend(store.write_batches([batch]))
                store.latest()
                prev = batch.payload_hash
        except StoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in signers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert outcomes == [WriteOutcome.INSERTED] * 40
    assert (store.counts().batches, store.counts().readings) == (40, 40)


# ----------------------------------------------- plain PostgreSQL path only (partitions)
# Weekly declarative partitions exist on the plain path only; TimescaleDB makes chunks
# itself (its tests are in tests/test_timescaledb.py).


@pytest.fixture
def pg_stores() -> Iterator[list[Store]]:
    """Stores opened by a PostgreSQL-only test, closed afterwards whatever happens."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


@pytest.mark.integration
def test_plain_path_partitions_created_for_a_multi_week_range(
    pg_session_database: str, pg_stores: list[Store]
) -> None:
    backend = Backend("postgresql", fresh_schema(pg_session_database))
    store = backend.open()
    pg_stores.append(store)
    assert isinstance(store, PostgresStore)
    store.migrate()
    start = 1_767_225_600_000  # Thursday 2026-01-01 00:00 UTC; its week began Mon 2025-12-29
    batches = []
    prev = GENESIS_HASH
    # 5 batches 8 days apart; seq 4 (Sunday 2026-01-25) also holds a reading of Monday,
    # so that one batch spans two partitions.
    for seq in range(1, 6):
        ts = start + (seq - 1) * 8 * DAY
        readings = [Reading(ts, "pm25", float(seq))]
        if seq == 4:
            readings.append(Reading(ts + DAY, "pm25", 44.0))
        batch = sealed(DEVICE_A, seq, readings, prev_hash=prev, sealed_at_ms=ts + 2 * DAY)
        batches.append(batch)
        prev = batch.payload_hash
    assert store.write_batches(batches) == [WriteOutcome.INSERTED] * 5
    expected = [
        "readings_w20251229",
        "readings_w20260105",
        "readings_w20260112",
        "readings_w20260119",
        "readings_w20260126",
        "readings_w20260202",
        "readings_default",
    ]
    assert store.partitions() == expected
    assert partition_name(partition_start(start)) == "readings_w20251229"
    placed = backend.query(
        "SELECT tableoid::regclass::text, count(*) FROM readings GROUP BY 1 ORDER BY 1"
    )
    assert placed == [(name, 1) for name in expected[:-1]]  # nothing in the DEFAULT one
    # another instance (cold partition cache) writes into the existing partitions
    other = backend.open()
    pg_stores.append(other)
    late = sealed(DEVICE_B, 1, [Reading(start + DAY, "pm25", 3.0)])
    assert other.write_batches([late]) == [WriteOutcome.INSERTED]
    assert store.partitions() == expected
    all_readings = store.readings(DEVICE_A.key_id, start - DAY, start + 60 * DAY)
    assert [r.value for r in all_readings] == [1.0, 2.0, 3.0, 4.0, 44.0, 5.0]


@pytest.mark.integration
def test_plain_path_rows_stranded_in_default_partition_do_not_block_writes(
    pg_session_database: str, pg_stores: list[Store]
) -> None:
    url = fresh_schema(pg_session_database)
    store = open_store(url, timescaledb="off")
    pg_stores.append(store)
    store.migrate()
    week = 1_893_456_000_000  # 2030-01-01
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO readings_default (device_id, ts, metric, value, quality, seq)"
            " VALUES ('x', to_timestamp(%s / 1000.0), 1, 1.0, 0, 1)",
            (week,),
        )
    batch = sealed(DEVICE_A, 1, [Reading(week + MIN, "pm25", 2.0)])
    assert store.write_batches([batch]) == [WriteOutcome.INSERTED]
    assert store.readings(DEVICE_A.key_id, week, week + DAY) == [Reading(week + MIN, "pm25", 2.0)]
    assert isinstance(store, PostgresStore)
    assert "readings_w20291231" not in store.partitions()


def test_reconnects_after_the_connection_is_killed(
    sql_backend: Backend, pg_stores: list[Store]
) -> None:
    store = sql_backend.open()
    pg_stores.append(store)
    store.migrate()
    store.write_batches([sealed(DEVICE_A, 1, [Reading(T0, "pm25", 1.0)])])
    # Only sessions of this test session's own database: never anyone else's.
    database = sql_backend.url.split("?", 1)[0]
    with psycopg.connect(database, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend') AS t"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    with pytest.raises(StoreError):
        store.counts()
    assert store.counts().batches == 1  # on a fresh connection


def _code(metric: str) -> int:
    from civicmesh.metrics import BY_NAME

    return BY_NAME[metric].code


def _fields(record: QuarantineRecord) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(record)
