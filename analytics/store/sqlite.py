"""Embedded single-file store (SQLite, WAL): the default of the one-machine deployment.

Times are integer epoch milliseconds. Each thread gets its own connection (SQLite
connections must not be shared across threads without care); WAL lets the API threads
read while the ingest thread writes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from analytics.store.auditlog import SQLITE, AuditTables
from analytics.store.base import (
    ROLLUPS,
    ZONE_ROLLUPS,
    DeviceStatus,
    LatestReading,
    RetentionPolicy,
    SeriesPoint,
    StoreCounts,
    StoredBatch,
    StoreError,
    WriteOutcome,
    ZoneSummary,
)
from analytics.store.common import (
    ALL_METRIC_CODES,
    IMPORTED_SUFFIX,
    IMPORTER_IDS,
    RAW_SOURCE,
    BatchKey,
    SqlRollupQueries,
    horizons_for,
    merge_ranges,
    metric_code,
    metric_name,
    newest_reading_ms,
    oldest_reading_ms,
    quarantine_payload,
    rebuild_plan,
    resolve_outcomes,
    touched_ranges,
    unique_batches,
    zone_horizons,
)
from analytics.store.schema import load_migrations, split_statements
from civicmesh.protocol import Reading
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000

_INSERT_BATCH = """
INSERT INTO batches (device_id, seq, payload_hash, prev_hash, sealed_at, model_version,
    gateway_id, received_at, ingested_at, n_readings, newest_reading, device_message,
    gateway_message, oldest_reading)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, seq) DO NOTHING
"""

_INSERT_READING = """
INSERT INTO readings (device_id, ts, metric, value, quality, raw, anomaly, seq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""

# Recompute one rollup level over one device's range [lo, hi) (already aligned to the
# level's bucket width): delete its buckets there, aggregate them again from below.
_DELETE_ROLLUP = "DELETE FROM {target} WHERE device_id = ? AND bucket >= ? AND bucket < ?"
_REFILL_FROM_READINGS = """
INSERT INTO {target} (device_id, metric, bucket, n, sum, min, max)
SELECT device_id, metric, (ts / {step}) * {step}, count(*), sum(value), min(value), max(value)
FROM readings WHERE device_id = ? AND ts >= ? AND ts < ?
GROUP BY metric, (ts / {step}) * {step}
"""
_REFILL_FROM_ROLLUP = """
INSERT INTO {target} (device_id, metric, bucket, n, sum, min, max)
SELECT device_id, metric, (bucket / {step}) * {step}, sum(n), sum(sum), min(min), max(max)
FROM {source} WHERE device_id = ? AND bucket >= ? AND bucket < ?
GROUP BY metric, (bucket / {step}) * {step}
"""

_ZONE_DELETE = "DELETE FROM {target} WHERE zone = ? AND bucket >= ? AND bucket < ?"
_ZONE_REFILL = """
INSERT INTO {target} (zone, metric, bucket, n, sum, min, max)
SELECT d.zone, s.metric, s.bucket, sum(s.n), sum(s.sum), min(s.min), max(s.max)
FROM devices d JOIN {source} s ON s.device_id = d.device_id
WHERE d.zone = ? AND s.bucket >= ? AND s.bucket < ?
GROUP BY s.metric, s.bucket
"""

_UPSERT_DEVICE = """
INSERT INTO devices (device_id, zone, lat, lon, kind, status, registered_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET zone = excluded.zone, lat = excluded.lat,
    lon = excluded.lon, kind = excluded.kind, status = excluded.status,
    registered_at = excluded.registered_at
"""

_INSERT_QUARANTINE = """
INSERT INTO quarantine (reason, detail, source, topic, received_at, payload_size,
    payload_sha256, payload, device_id, seq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


class SqliteStore(SqlRollupQueries):
    """Store in one SQLite file; safe to share between threads (one connection each)."""

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # The public audit log (issue 21): leaves written in write_batches' transaction.
        self.audit = AuditTables(SQLITE, self._read, self._transaction)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # -- connections ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never
            # opened behind our back by the sqlite3 module.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"Cannot open SQLite store {self.path}: {exc}") from exc
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; sqlite errors -> StoreError."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.warning("rollback after failed %s failed too: %s", what, rollback_exc)
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{what} failed: {exc}") from exc
            raise

    def _read(self, what: str, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return query(self._conn())
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    # Hooks of the shared rollup queries.
    def _param(self, name: str) -> str:
        return f":{name}"

    def _time(self, ms: int) -> Any:
        return ms

    def _epoch_ms(self, column: str) -> str:
        return column

    def _rows(self, what: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._read(what, lambda c: c.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> list[str]:
        applied_now: list[str] = []
        # BEGIN IMMEDIATE takes the write lock first, so two processes migrating at once
        # run one after the other and the second finds nothing to do.
        with self._transaction("migration") as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for migration in load_migrations(self.backend):
                if migration.version in done:
                    continue
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, now_ms()),
                )
                applied_now.append(migration.name)
        if applied_now:
            log.info("sqlite store %s: applied migrations %s", self.path, ", ".join(applied_now))
        return applied_now

    # -- writes ---------------------------------------------------------------

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteOutcome]:
        if not batches:
            return []
        inserted: set[BatchKey] = set()
        stored: dict[BatchKey, bytes] = {}
        with self._transaction(f"writing {len(batches)} batches") as conn:
            rows: list[tuple[Any, ...]] = []
            fresh: list[StoredBatch] = []
            for batch in unique_batches(batches):
                key = (batch.device_id, batch.seq)
                cursor = conn.execute(
                    _INSERT_BATCH,
                    (
                        batch.device_id,
                        batch.seq,
                        batch.payload_hash,
                        batch.prev_hash,
                        batch.sealed_at_ms,
                        batch.model_version,
                        batch.gateway_id,
                        batch.received_at_ms,
                        batch.ingested_at_ms,
                        len(batch.readings),
                        newest_reading_ms(batch),
                        batch.device_message,
                        batch.gateway_message,
                        oldest_reading_ms(batch),
                    ),
                )
                if cursor.rowcount == 1:
                    inserted.add(key)
                    rows.extend(_reading_rows(batch))
                    fresh.append(batch)
                else:
                    found = conn.execute(
                        "SELECT payload_hash FROM batches WHERE device_id = ? AND seq = ?", key
                    ).fetchone()
                    if found is not None:
                        stored[key] = bytes(found[0])
            conn.executemany(_INSERT_READING, rows)
            conn.executemany(
                "INSERT INTO rollup_dirty (device_id, lo, hi) VALUES (?, ?, ?)",
                touched_ranges(fresh),
            )
            self.audit.append(conn, fresh)
        return resolve_outcomes(batches, inserted, stored)

    def add_quarantine(self, records: Sequence[QuarantineRecord]) -> None:
        if not records:
            return
        rows = [
            (
                r.reason,
                r.detail,
                r.source,
                r.topic,
                r.received_at_ms,
                r.payload_size,
                r.payload_sha256,
                quarantine_payload(r),
                r.device_id,
                r.seq,
            )
            for r in records
        ]
        with self._transaction(f"adding {len(rows)} quarantine records") as conn:
            conn.executemany(_INSERT_QUARANTINE, rows)

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> None:
        rows = [
            (d.device_id, d.zone, d.lat, d.lon, d.kind, d.status, d.registered_at_ms)
            for d in records
        ]
        if not rows:
            return
        with self._transaction(f"upserting {len(rows)} devices") as conn:
            conn.executemany(_UPSERT_DEVICE, rows)

    # -- reads ----------------------------------------------------------------

    def devices(self) -> list[DeviceStatus]:
        sql = """
            SELECT d.device_id, d.zone, d.lat, d.lon, d.kind, d.status,
                   coalesce(b.newest_reading, b.newest_sealed), b.last_seq, coalesce(b.n, 0)
            FROM devices d
            LEFT JOIN (
                SELECT device_id, max(newest_reading) AS newest_reading,
                       max(sealed_at) AS newest_sealed, max(seq) AS last_seq, count(*) AS n
                FROM batches GROUP BY device_id
            ) b ON b.device_id = d.device_id
            ORDER BY d.device_id
        """
        rows = self._read("listing devices", lambda c: c.execute(sql).fetchall())
        return [DeviceStatus(*row) for row in rows]

    def zones(self) -> list[ZoneSummary]:
        sql = """
            SELECT zone, count(*), avg(lat), avg(lon) FROM devices GROUP BY zone ORDER BY zone
        """
        rows = self._read("listing zones", lambda c: c.execute(sql).fetchall())
        return [ZoneSummary(*row) for row in rows]

    def latest(self, zone: str | None = None) -> list[LatestReading]:
        # One index probe per (device, metric) on (device_id, metric, ts) instead of a
        # scan of all readings; the VALUES list enumerates the metric catalogue.
        codes = ", ".join(f"({code})" for code in ALL_METRIC_CODES)
        sql = f"""
            WITH metric_codes(code) AS (VALUES {codes})
            SELECT d.device_id, d.zone, r.metric, r.ts, r.value, r.quality
            FROM devices d
            CROSS JOIN metric_codes m
            JOIN readings r ON r.rowid = (
                SELECT rowid FROM readings
                WHERE device_id = d.device_id AND metric = m.code
                ORDER BY ts DESC LIMIT 1
            )
            WHERE ?1 IS NULL OR d.zone = ?1
            ORDER BY d.device_id, r.metric
        """
        rows = self._read("reading latest values", lambda c: c.execute(sql, (zone,)).fetchall())
        return [
            LatestReading(device_id, zone_, metric_name(code), ts, value, quality)
            for device_id, zone_, code, ts, value, quality in rows
        ]

    def series(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        bucket_s: int,
        *,
        zone: str | None = None,
        device_id: str | None = None,
    ) -> list[SeriesPoint]:
        bucket_ms = _bucket_ms(bucket_s)
        where = ["r.metric = :metric", "r.ts >= :start", "r.ts < :end"]
        if device_id is not None:
            where.append("r.device_id = :device")
        if zone is not None:
            where.append("r.device_id IN (SELECT device_id FROM devices WHERE zone = :zone)")
        # ts >= 2000-01-01 > 0, so integer division is the floor: buckets align to the epoch.
        sql = f"""
            SELECT (r.ts / :bucket) * :bucket AS bucket, count(*), avg(r.value),
                   min(r.value), max(r.value)
            FROM readings r
            WHERE {" AND ".join(where)}
            GROUP BY bucket ORDER BY bucket
        """
        params = {
            "metric": metric_code(metric),
            "start": start_ms,
            "end": end_ms,
            "bucket": bucket_ms,
            "device": device_id,
            "zone": zone,
        }
        rows = self._read("reading a series", lambda c: c.execute(sql, params).fetchall())
        return [SeriesPoint(*row) for row in rows]

    # -- rollups --------------------------------------------------------------

    def refresh_rollups(self) -> int:
        with self._transaction("refreshing rollups") as conn:
            taken = conn.execute("DELETE FROM rollup_dirty RETURNING device_id, lo, hi").fetchall()
            ranges = merge_ranges((str(d), int(lo), int(hi)) for d, lo, hi in taken)
            horizons = {
                str(relation): int(horizon)
                for relation, horizon in conn.execute(
                    "SELECT relation, horizon FROM retention_horizons"
                ).fetchall()
            }
            importers = {str(d) for (d,) in conn.execute(IMPORTER_IDS).fetchall()}
            by_kind = {kind: horizons_for(horizons, kind) for kind in (False, True)}
            skipped: set[str] = set()
            for device, lo, hi in ranges:
                own = by_kind[device in importers]
                for level, resolution in enumerate(ROLLUPS):
                    # From the level below where it is complete, else from a finer one down
                    # to the readings; buckets no source holds whole are kept as they are.
                    finer = [r.table for r in reversed(ROLLUPS[:level])] + [RAW_SOURCE]
                    step = resolution.seconds * 1000
                    plan, lost = rebuild_plan(
                        lo, hi, step, [(name, own.get(name)) for name in finer]
                    )
                    if lost:
                        skipped.add(resolution.table)
                    target = resolution.table
                    for source, first, end in plan:
                        conn.execute(_DELETE_ROLLUP.format(target=target), (device, first, end))
                        refill = (
                            _REFILL_FROM_READINGS if source == RAW_SOURCE else _REFILL_FROM_ROLLUP
                        )
                        conn.execute(
                            refill.format(target=target, source=source, step=step),
                            (device, first, end),
                        )
            _refresh_zones(conn, ranges, horizons)
        if skipped:
            log.warning(
                "%r: late data older than a retention: buckets of %s kept as they were (their "
                "source no longer holds all of their data); the readings themselves are stored",
                self,
                ", ".join(sorted(skipped)),
            )
        return len(ranges)

    def apply_retention(self, now_ms: int, policy: RetentionPolicy) -> dict[str, int]:
        dropped: dict[str, int] = {}
        tables = [("readings", "ts", policy.raw_days)] + [
            (r.table, "bucket", days)
            for r, days in zip(
                ROLLUPS,
                (policy.rollup_1m_days, policy.rollup_1h_days, policy.rollup_1d_days),
                strict=True,
            )
        ]
        for table, column, days in tables:
            if days is None:
                continue
            cutoff = now_ms - int(days * 86_400_000)
            # Imported history stays unless the policy includes it.
            spare = "" if policy.include_imported else f" AND device_id NOT IN ({IMPORTER_IDS})"
            relations = [table] + ([table + IMPORTED_SUFFIX] if policy.include_imported else [])
            with self._transaction(f"retention on {table}") as conn:
                cursor = conn.execute(f"DELETE FROM {table} WHERE {column} < ?{spare}", (cutoff,))
                dropped[table] = cursor.rowcount
                # What is gone, so late data is never rolled up from a trimmed level.
                conn.executemany(
                    "INSERT INTO retention_horizons (relation, horizon) VALUES (?, ?)"
                    " ON CONFLICT (relation) DO UPDATE"
                    " SET horizon = max(horizon, excluded.horizon)",
                    [(relation, cutoff) for relation in relations],
                )
        return dropped

    def readings(
        self, device_id: str, start_ms: int, end_ms: int, metric: str | None = None
    ) -> list[Reading]:
        codes = ALL_METRIC_CODES if metric is None else (metric_code(metric),)
        marks = ", ".join("?" for _ in codes)
        sql = f"""
            SELECT ts, metric, value, quality, raw, anomaly FROM readings
            WHERE device_id = ? AND metric IN ({marks}) AND ts >= ? AND ts < ?
            ORDER BY ts, metric, seq
        """
        params = (device_id, *codes, start_ms, end_ms)
        rows = self._read("reading raw readings", lambda c: c.execute(sql, params).fetchall())
        return [
            Reading(ts, metric_name(code), value, quality, raw, anomaly)
            for ts, code, value, quality, raw, anomaly in rows
        ]

    def counts(self) -> StoreCounts:
        # Readings are counted from the ledger (they are written together, atomically):
        # far cheaper than count(*) over the readings table.
        sql = """
            SELECT (SELECT count(*) FROM batches),
                   (SELECT coalesce(sum(n_readings), 0) FROM batches),
                   (SELECT count(*) FROM quarantine)
        """
        row = self._read("counting", lambda c: c.execute(sql).fetchone())
        return StoreCounts(*row)

    def status(self) -> dict[str, Any]:
        """What ``civicmesh db status`` shows (see :mod:`analytics.store.status`)."""

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {"backend": "sqlite", "warnings": [], "path": str(self.path)}
            version = conn.execute(
                "SELECT version, name FROM schema_migrations ORDER BY version DESC LIMIT 1"
            ).fetchone()
            if version is not None:
                out["schema_version"], out["schema_name"] = version
            return out

        out = self._read("reading the store status", run)
        counts = self.counts()
        out["counts"] = {
            "batches": counts.batches,
            "readings": counts.readings,
            "quarantined": counts.quarantined,
        }
        return out


def _refresh_zones(
    conn: sqlite3.Connection, ranges: Sequence[tuple[str, int, int]], horizons: dict[str, int]
) -> None:
    """Recompute the zone rollups over the zones and windows ``ranges`` touched, where the
    device rollup they sum is complete."""
    zone_of = dict(conn.execute("SELECT device_id, zone FROM devices").fetchall())
    mixed = {
        str(zone)
        for (zone,) in conn.execute("SELECT DISTINCT zone FROM devices WHERE kind <> 'import'")
    }
    windows: dict[str, tuple[int, int]] = {}
    for device, lo, hi in ranges:
        zone = zone_of.get(device)
        if zone is None:
            continue
        old = windows.get(zone)
        windows[zone] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    for resolution in ZONE_ROLLUPS:
        step = resolution.seconds * 1000
        for zone, (lo, hi) in windows.items():
            horizon = zone_horizons(horizons, zone not in mixed).get(resolution.table)
            first, end = (lo // step) * step, (hi // step) * step + step
            if horizon is not None:
                first = max(first, -(-horizon // step) * step)
            if first >= end:
                continue
            conn.execute(_ZONE_DELETE.format(target=resolution.zone_table), (zone, first, end))
            conn.execute(
                _ZONE_REFILL.format(target=resolution.zone_table, source=resolution.table),
                (zone, first, end),
            )


def _reading_rows(batch: StoredBatch) -> Iterator[tuple[Any, ...]]:
    for r in batch.readings:
        yield (batch.device_id, r.ts_ms, metric_code(r.metric), r.value, r.quality, r.raw,
               r.anomaly, batch.seq)  # fmt: skip


def _bucket_ms(bucket_s: int) -> int:
    if bucket_s <= 0:
        raise StoreError(f"Series bucket must be a positive number of seconds, not {bucket_s}")
    return bucket_s * 1000


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying: while another connection creates the same file, SQLite can
    answer "database is locked" here without consulting the busy handler."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
