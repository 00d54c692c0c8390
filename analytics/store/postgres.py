"""Central store on PostgreSQL (psycopg 3): partitioned readings, COPY on the hot path.

Each thread gets its own connection (autocommit; transactions are explicit). Readings
are range-partitioned by week on ``ts``; the partitions a write needs are created just
before its transaction, in a short transaction of their own, so the exclusive lock that
creating a partition takes on ``readings`` is held for milliseconds, not for a whole write.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict

from analytics.store.auditlog import POSTGRES, AuditTables
from analytics.store.base import (
    ROLLUPS,
    ZONE_ROLLUPS,
    DeviceStatus,
    LatestReading,
    LedgerEntry,
    RetentionPolicy,
    SeriesPoint,
    StoragePolicy,
    StoreCounts,
    StoredBatch,
    StoreError,
    WriteOutcome,
    ZoneSummary,
)
from analytics.store.common import (
    ALL_METRIC_CODES,
    BatchKey,
    SqlRollupQueries,
    merge_ranges,
    metric_code,
    metric_name,
    newest_reading_ms,
    oldest_reading_ms,
    payload_b64,
    quarantine_payload,
    resolve_outcomes,
    touched_ranges,
    unique_batches,
)
from analytics.store.pgcopy import encode_readings
from analytics.store.schema import NO_TRANSACTION, Migration, load_migrations
from civicmesh.protocol import Reading
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
PARTITION_SPAN = timedelta(days=7)  # ISO weeks: Monday 00:00 UTC to the next Monday
# pg_advisory_xact_lock keys ("civicmesh" store namespace, per purpose).
MIGRATION_LOCK = 0x63_6D_73_74_01
PARTITION_LOCK = 0x63_6D_73_74_02
ROLLUP_LOCK = 0x63_6D_73_74_03
REFRESH_CHUNK = 8  # device ranges per refresh statement
CONNECT_TIMEOUT_S = 10

_READING_COLUMNS = ("device_id", "ts", "metric", "value", "quality", "raw", "anomaly", "seq")
_READING_TYPES = ("text", "timestamptz", "int2", "float8", "int4", "float8", "float8", "int8")
_COPY_READINGS = f"COPY readings ({', '.join(_READING_COLUMNS)}) FROM STDIN (FORMAT BINARY)"

# One statement for the whole list: arrays in, the keys actually inserted out.
_INSERT_BATCHES = """
INSERT INTO batches (device_id, seq, payload_hash, prev_hash, sealed_at, model_version,
    gateway_id, received_at, ingested_at, n_readings, newest_reading, device_message,
    gateway_message, oldest_reading)
SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bytea[], %s::bytea[], %s::timestamptz[],
    %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::integer[],
    %s::timestamptz[], %s::bytea[], %s::bytea[], %s::timestamptz[])
ON CONFLICT (device_id, seq) DO NOTHING
RETURNING device_id, seq
"""

_MARK_DIRTY = """
INSERT INTO rollup_dirty (device_id, lo, hi)
SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::timestamptz[])
"""

# Recompute one rollup level over (device, lo, hi) ranges: delete its buckets there and
# aggregate them again from the level below (readings for 1 min). {step} is the bucket
# width; {source}/{aggregates} name the level below and how its rows add up.
_RANGES = """
WITH ranges AS (
    SELECT device_id, date_bin({step}, lo, 'epoch'::timestamptz) AS lo,
           date_bin({step}, hi, 'epoch'::timestamptz) + {step} AS hi
    FROM unnest(%(devices)s::text[], %(los)s::timestamptz[], %(his)s::timestamptz[])
        AS r(device_id, lo, hi)
)
"""
# Two statements, not one with a DELETE in a CTE: the INSERT of the same statement would
# not see the deletion and collide with the rows it replaces.
_RECOMPUTE_DELETE = (
    _RANGES
    + """DELETE FROM {target} t USING ranges r
WHERE t.device_id = r.device_id AND t.bucket >= r.lo AND t.bucket < r.hi
"""
)
_RECOMPUTE_INSERT = (
    _RANGES
    + """INSERT INTO {target} (device_id, metric, bucket, n, sum, min, max)
SELECT s.device_id, s.metric, date_bin({step}, s.{time}, 'epoch'::timestamptz),
       {aggregates}
FROM {source} s JOIN ranges r
    ON s.device_id = r.device_id AND s.{time} >= r.lo AND s.{time} < r.hi
    AND s.metric = ANY(%(codes)s::smallint[])
GROUP BY 1, 2, 3
"""
)
# Zone rollups over the zones and windows the refreshed device ranges touched.
_ZONE_WINDOWS = """
WITH touched AS (
    SELECT d.zone, date_bin({step}, min(r.lo), 'epoch'::timestamptz) AS lo,
           date_bin({step}, max(r.hi), 'epoch'::timestamptz) + {step} AS hi
    FROM unnest(%(devices)s::text[], %(los)s::timestamptz[], %(his)s::timestamptz[])
        AS r(device_id, lo, hi)
    JOIN devices d ON d.device_id = r.device_id
    GROUP BY d.zone
)
"""
_ZONE_DELETE = (
    _ZONE_WINDOWS
    + """DELETE FROM {target} t USING touched w
WHERE t.zone = w.zone AND t.bucket >= w.lo AND t.bucket < w.hi
"""
)
_ZONE_INSERT = (
    _ZONE_WINDOWS
    + """INSERT INTO {target} (zone, metric, bucket, n, sum, min, max)
SELECT w.zone, s.metric, s.bucket, sum(s.n), sum(s.sum), min(s.min), max(s.max)
FROM touched w
JOIN devices d ON d.zone = w.zone
JOIN {source} s ON s.device_id = d.device_id AND s.metric = ANY(%(codes)s::smallint[])
    AND s.bucket >= w.lo AND s.bucket < w.hi
GROUP BY 1, 2, 3
"""
)
_FROM_READINGS = "count(*), sum(s.value), min(s.value), max(s.value)"
_FROM_ROLLUP = "sum(s.n), sum(s.sum), min(s.min), max(s.max)"

_STORED_HASHES = """
SELECT b.device_id, b.seq, b.payload_hash
FROM batches b JOIN unnest(%s::text[], %s::bigint[]) AS k(device_id, seq)
    ON b.device_id = k.device_id AND b.seq = k.seq
"""

_UPSERT_DEVICE = """
INSERT INTO devices (device_id, zone, lat, lon, kind, status, registered_at)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (device_id) DO UPDATE SET zone = excluded.zone, lat = excluded.lat,
    lon = excluded.lon, kind = excluded.kind, status = excluded.status,
    registered_at = excluded.registered_at
"""

_INSERT_QUARANTINE = """
INSERT INTO quarantine (reason, detail, source, topic, received_at, payload_size,
    payload_sha256, payload, device_id, seq)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def ms_to_ts(ms: int) -> datetime:
    """Epoch ms to an aware UTC datetime, exactly (no float rounding)."""
    return EPOCH + timedelta(milliseconds=ms)


def _ms(column: str) -> str:
    """SQL for a timestamptz column as epoch ms (extract() is numeric, so exact)."""
    return f"(extract(epoch FROM {column}) * 1000)::bigint"


def partition_start(ms: int) -> date:
    """Monday (UTC) of the week holding ``ms``: the lower bound of its partition."""
    day = ms_to_ts(ms).date()
    return day - timedelta(days=day.weekday())


def partition_name(start: date) -> str:
    return f"readings_w{start:%Y%m%d}"


def _statements(script: str) -> list[str]:
    """The statements of a migration file: split after each line ending in ";" (the
    migrations that run this way hold no function bodies or DO blocks)."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if not current and (not line.strip() or line.strip().startswith("--")):
            continue  # comments and blank lines between statements
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip())
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


def _partition_date(name: str) -> date:
    return datetime.strptime(name.removeprefix("readings_w"), "%Y%m%d").date()


def _to_ms(ts: datetime) -> int:
    return (ts - EPOCH) // _ONE_MS


class PostgresStore(SqlRollupQueries):
    """Store on a PostgreSQL server; safe to share between threads (one connection each)."""

    backend = "postgresql"

    def __init__(self, conninfo: str, *, timescaledb: str = "auto") -> None:
        if timescaledb not in ("auto", "require", "off"):
            raise StoreError(f"timescaledb must be auto, require or off, not {timescaledb!r}")
        self._timescale_mode = timescaledb
        self.timescale = False  # decided by migrate(): the TimescaleDB path is active
        self._conninfo = conninfo
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[psycopg.Connection[Any]] = []
        self._partitions: set[date] = set()  # known to exist: skip the catalog on hot path
        self._closed = False
        # The public audit log (issue 21): leaves written in write_batches' transaction.
        self.audit = AuditTables(POSTGRES, self._read, self._transaction)

    def __repr__(self) -> str:
        # Never show the password.
        try:
            parts = conninfo_to_dict(self._conninfo)
        except psycopg.ProgrammingError:
            return "PostgresStore(<unparsable conninfo>)"
        return f"PostgresStore(host={parts.get('host')!r}, dbname={parts.get('dbname')!r})"

    # -- connections ----------------------------------------------------------

    def _conn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        try:
            conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        except psycopg.Error as exc:
            raise StoreError(f"Cannot connect to {self!r}: {exc}") from exc
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _failed(self, conn: psycopg.Connection[Any], what: str, exc: psycopg.Error) -> StoreError:
        """The StoreError for ``exc``; a broken connection is dropped so the next call
        reconnects (the server restarted, the network blipped)."""
        if conn.broken or conn.closed:
            log.warning("%r: connection lost during %s; reconnecting on next use", self, what)
            self._local.conn = None
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()
        return StoreError(f"{what} failed: {exc}")

    @contextmanager
    def _transaction(self, what: str) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction, rolled back on any error; psycopg errors -> StoreError."""
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            raise self._failed(conn, what, exc) from exc

    def _read(self, what: str, query: Callable[[psycopg.Cursor[Any]], T]) -> T:
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                return query(cur)
        except psycopg.Error as exc:
            raise self._failed(conn, what, exc) from exc

    def _fetch(self, what: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        def run(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cur.execute(sql, params)
            return cur.fetchall()

        return self._read(what, run)

    # Hooks of the shared rollup queries.
    def _param(self, name: str) -> str:
        return f"%({name})s"

    def _time(self, ms: int) -> Any:
        return ms_to_ts(ms)

    def _epoch_ms(self, column: str) -> str:
        return _ms(column)

    def _json_param(self, name: str) -> str:
        return f"CAST(%({name})s AS jsonb)"

    def _rows(self, what: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._fetch(what, sql, params)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Pick the path (TimescaleDB when the extension is there, see :meth:`_choose_path`)
        and apply its pending migrations."""
        applied_now: list[str] = []
        deferred: list[Migration] = []
        with self._transaction("migration") as cur:
            # Serialises concurrent migrate() calls (several ingest workers starting at
            # once); the lock ends with the transaction.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            row = cur.fetchone()
            fresh = row is None or not row[0]
            if fresh:
                cur.execute(
                    "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            self._choose_path(cur, fresh)
            cur.execute("SELECT version FROM schema_migrations")
            done = {version for (version,) in cur.fetchall()}
            for migration in load_migrations(self.backend):
                if migration.version in done:
                    continue
                if NO_TRANSACTION in migration.sql:
                    deferred.append(migration)  # runs below, outside this transaction
                    continue
                if deferred:
                    break  # keep the order: nothing after a deferred migration yet
                # Without parameters psycopg sends the script as one simple query, so a
                # file may hold many statements; all run inside this transaction.
                cur.execute(migration.sql.encode("utf-8"))
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied_now.append(migration.name)
        for migration in deferred:
            applied_now.append(self._migrate_outside_transaction(migration))
        if deferred:
            applied_now += self.migrate()  # whatever followed the deferred ones
        if applied_now:
            log.info("%r: applied migrations %s", self, ", ".join(applied_now))
        return applied_now

    def _choose_path(self, cur: psycopg.Cursor[Any], fresh: bool) -> None:
        """TimescaleDB or plain PostgreSQL, decided once per database and logged.

        An existing schema keeps its path (readings is a hypertable or it is not). A new
        one takes TimescaleDB when the extension can be had, unless configured ``off``.
        """
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        installed = cur.fetchone()
        if not fresh:
            timescale = False
            if installed is not None:
                cur.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables"
                    " WHERE hypertable_name = 'readings' AND hypertable_schema = current_schema()"
                )
                timescale = cur.fetchone() is not None
            version = installed[0] if installed is not None else None
        else:
            cur.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
            )
            available = cur.fetchone()
            timescale = self._timescale_mode != "off" and available is not None
            version = available[0] if available is not None else None
        if self._timescale_mode == "require" and not timescale:
            raise StoreError(
                f"{self!r}: storage.timescaledb is 'require' but the TimescaleDB path is not "
                "available (install the extension before the first migration, or use 'auto')"
            )
        if timescale != self.timescale or not getattr(self, "_path_logged", False):
            log.info(
                "%r: store path %s",
                self,
                f"TimescaleDB {version} (hypertables, continuous aggregates)"
                if timescale
                else "plain PostgreSQL (declarative partitions, rollup tables)"
                + ("" if version is None else f"; TimescaleDB {version} is available but off"),
            )
            self._path_logged = True
        self.timescale = timescale
        self.backend = "timescaledb" if timescale else "postgresql"

    def _migrate_outside_transaction(self, migration: Migration) -> str:
        """Run a migration statement by statement in autocommit mode (TimescaleDB's
        continuous aggregates refuse to be created inside a transaction block). Its
        statements are idempotent, so a run cut short can be repeated."""
        conn = self._conn()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                row = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                ).fetchone()
                if row is None:
                    for statement in _statements(migration.sql):
                        conn.execute(statement.encode("utf-8"))
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        except psycopg.Error as exc:
            raise self._failed(conn, f"migration {migration.name}", exc) from exc
        return migration.name

    def configure(self, settings: StoragePolicy) -> None:
        """Apply the configurable TimescaleDB policies: chunk interval, compression and
        retention (re-added when changed). The plain path needs nothing here."""
        if not self.timescale:
            return
        conn = self._conn()
        chunk = timedelta(hours=settings.chunk_hours)
        try:
            conn.execute("SELECT set_chunk_time_interval('readings', %s::interval)", (chunk,))
            conn.execute("SELECT remove_compression_policy('readings', if_exists => true)")
            conn.execute(
                "SELECT add_compression_policy('readings', %s::interval)",
                (timedelta(days=settings.compress_after_days),),
            )
            for relation, days in (
                ("readings", settings.retention.raw_days),
                ("rollup_1m", settings.retention.rollup_1m_days),
                ("rollup_1h", settings.retention.rollup_1h_days),
                ("rollup_1d", settings.retention.rollup_1d_days),
            ):
                conn.execute(
                    "SELECT remove_retention_policy(%s::regclass, if_exists => true)", (relation,)
                )
                if days is not None:
                    conn.execute(
                        "SELECT add_retention_policy(%s::regclass, %s::interval)",
                        (relation, timedelta(days=days)),
                    )
        except psycopg.Error as exc:
            raise self._failed(conn, "configuring TimescaleDB policies", exc) from exc
        log.info(
            "%r: TimescaleDB chunks of %s, compression after %g days, retention %s",
            self,
            chunk,
            settings.compress_after_days,
            settings.retention,
        )

    def partitions(self) -> list[str]:
        """Names of the readings partitions, oldest first (the DEFAULT one last); on
        TimescaleDB, its chunks."""
        if self.timescale:
            return [
                str(name)
                for (name,) in self._fetch("listing chunks", "SELECT show_chunks('readings')")
            ]
        rows = self._fetch(
            "listing partitions",
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'readings'::regclass ORDER BY c.relname = 'readings_default',"
            " c.relname",
        )
        return [name for (name,) in rows]

    def _ensure_partitions(self, batches: Sequence[StoredBatch]) -> None:
        """Create the weekly partitions ``batches`` write into, unless known to exist."""
        if self.timescale:
            return  # TimescaleDB creates chunks itself
        needed: set[date] = set()
        for batch in batches:
            if batch.oldest_ms is None or batch.newest_ms is None:
                continue
            first = partition_start(batch.oldest_ms)
            last = partition_start(batch.newest_ms)
            while first <= last:
                needed.add(first)
                first += PARTITION_SPAN
        with self._lock:
            missing = sorted(needed - self._partitions)
        if missing:
            self._create_partitions(missing)

    def _create_partitions(self, missing: Sequence[date]) -> None:
        created: list[str] = []
        with self._transaction("creating readings partitions") as cur:
            # Two workers creating the same partition would race in the catalog.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            for start in missing:
                name = partition_name(start)
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
                row = cur.fetchone()
                if row is not None and row[0]:
                    continue
                self._create_partition(cur, start)
                created.append(name)
        with self._lock:
            self._partitions.update(missing)
        if created:
            log.info("%r: created readings partitions %s", self, ", ".join(created))

    def _create_partition(self, cur: psycopg.Cursor[Any], start: date) -> None:
        name = partition_name(start)
        lower = datetime(start.year, start.month, start.day, tzinfo=UTC)
        statement = pgsql.SQL(
            "CREATE TABLE {} PARTITION OF readings FOR VALUES FROM ({}) TO ({})"
        ).format(
            pgsql.Identifier(name),
            pgsql.Literal(lower),
            pgsql.Literal(lower + PARTITION_SPAN),
        )
        try:
            # A savepoint, so a refusal leaves the other partitions of the list intact.
            with cur.connection.transaction():
                cur.execute(statement)
        except psycopg.errors.CheckViolation:
            # Rows of this week already sit in the DEFAULT partition (written while the
            # partition was missing); PostgreSQL refuses to split them out. They stay
            # there and remain queryable; moving them is an operator task.
            log.warning(
                "%r: partition %s not created: the DEFAULT partition holds rows of that week",
                self,
                name,
            )

    # -- writes ---------------------------------------------------------------

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteOutcome]:
        if not batches:
            return []
        unique = unique_batches(batches)
        self._ensure_partitions(unique)
        columns: list[list[Any]] = [[] for _ in range(14)]
        for b in unique:
            newest = newest_reading_ms(b)
            oldest = oldest_reading_ms(b)
            values = (
                b.device_id,
                b.seq,
                b.payload_hash,
                b.prev_hash,
                ms_to_ts(b.sealed_at_ms),
                b.model_version,
                b.gateway_id,
                ms_to_ts(b.received_at_ms),
                ms_to_ts(b.ingested_at_ms),
                len(b.readings),
                None if newest is None else ms_to_ts(newest),
                b.device_message,
                b.gateway_message,
                None if oldest is None else ms_to_ts(oldest),
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        stored: dict[BatchKey, bytes] = {}
        with self._transaction(f"writing {len(batches)} batches") as cur:
            # Binary parameters: the signed messages go as bytes, not escaped hex text.
            cur.execute(_INSERT_BATCHES, columns, binary=True)
            inserted: set[BatchKey] = {(device, seq) for device, seq in cur.fetchall()}
            existing = [b for b in unique if (b.device_id, b.seq) not in inserted]
            if existing:
                cur.execute(
                    _STORED_HASHES,
                    ([b.device_id for b in existing], [b.seq for b in existing]),
                )
                stored = {(device, seq): bytes(h) for device, seq, h in cur.fetchall()}
            fresh = [b for b in unique if (b.device_id, b.seq) in inserted and b.readings]
            if fresh:
                with cur.copy(_COPY_READINGS) as copy:
                    encoded = encode_readings(fresh)
                    if encoded is not None:
                        copy.write(encoded)
                    else:  # device ids of mixed length: row by row
                        copy.set_types(list(_READING_TYPES))
                        for b in fresh:
                            for r in b.readings:
                                copy.write_row(
                                    (b.device_id, ms_to_ts(r.ts_ms), metric_code(r.metric),
                                     r.value, r.quality, r.raw, r.anomaly, b.seq)
                                )  # fmt: skip
                dirty = touched_ranges(fresh)
                cur.execute(
                    _MARK_DIRTY,
                    (
                        [d for d, _, _ in dirty],
                        [ms_to_ts(lo) for _, lo, _ in dirty],
                        [ms_to_ts(hi) for _, _, hi in dirty],
                    ),
                )
            # Last, so the audit_head row lock is held only until the commit.
            self.audit.append(cur, [b for b in unique if (b.device_id, b.seq) in inserted])
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
                ms_to_ts(r.received_at_ms),
                r.payload_size,
                r.payload_sha256,
                quarantine_payload(r),
                r.device_id,
                r.seq,
            )
            for r in records
        ]
        with self._transaction(f"adding {len(rows)} quarantine records") as cur:
            cur.executemany(_INSERT_QUARANTINE, rows)

    def upsert_devices(self, records: Iterable[DeviceRecord]) -> None:
        rows = [
            (d.device_id, d.zone, d.lat, d.lon, d.kind, d.status, ms_to_ts(d.registered_at_ms))
            for d in records
        ]
        if not rows:
            return
        with self._transaction(f"upserting {len(rows)} devices") as cur:
            cur.executemany(_UPSERT_DEVICE, rows)

    # -- reads ----------------------------------------------------------------

    def devices(self) -> list[DeviceStatus]:
        sql = f"""
            SELECT d.device_id, d.zone, d.lat, d.lon, d.kind, d.status,
                   {_ms("coalesce(b.newest_reading, b.newest_sealed)")}, b.last_seq,
                   coalesce(b.n, 0)
            FROM devices d
            LEFT JOIN (
                SELECT device_id, max(newest_reading) AS newest_reading,
                       max(sealed_at) AS newest_sealed, max(seq) AS last_seq, count(*) AS n
                FROM batches GROUP BY device_id
            ) b ON b.device_id = d.device_id
            ORDER BY d.device_id
        """
        return [DeviceStatus(*row) for row in self._fetch("listing devices", sql)]

    def zones(self) -> list[ZoneSummary]:
        sql = "SELECT zone, count(*), avg(lat), avg(lon) FROM devices GROUP BY zone ORDER BY zone"
        return [ZoneSummary(*row) for row in self._fetch("listing zones", sql)]

    def latest(self, zone: str | None = None) -> list[LatestReading]:
        # One backward index probe per (device, metric) instead of DISTINCT ON, which
        # would sort every reading ever stored.
        sql = f"""
            SELECT d.device_id, d.zone, m.code, {_ms("r.ts")}, r.value, r.quality
            FROM devices d
            CROSS JOIN unnest(%(codes)s::smallint[]) AS m(code)
            CROSS JOIN LATERAL (
                SELECT ts, value, quality FROM readings
                WHERE device_id = d.device_id AND metric = m.code
                ORDER BY ts DESC LIMIT 1
            ) r
            WHERE %(zone)s::text IS NULL OR d.zone = %(zone)s::text
            ORDER BY d.device_id, m.code
        """
        rows = self._fetch(
            "reading latest values", sql, {"codes": list(ALL_METRIC_CODES), "zone": zone}
        )
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
        if bucket_s <= 0:
            raise StoreError(f"Series bucket must be a positive number of seconds, not {bucket_s}")
        where = ["r.metric = %(metric)s", "r.ts >= %(start)s", "r.ts < %(end)s"]
        if device_id is not None:
            where.append("r.device_id = %(device)s")
        if zone is not None:
            where.append("r.device_id IN (SELECT device_id FROM devices WHERE zone = %(zone)s)")
        sql = f"""
            SELECT {_ms("date_bin(%(bucket)s, r.ts, 'epoch'::timestamptz)")} AS bucket,
                   count(*), avg(r.value), min(r.value), max(r.value)
            FROM readings r
            WHERE {" AND ".join(where)}
            GROUP BY 1 ORDER BY 1
        """
        params = {
            "metric": metric_code(metric),
            "start": ms_to_ts(start_ms),
            "end": ms_to_ts(end_ms),
            "bucket": timedelta(seconds=bucket_s),
            "device": device_id,
            "zone": zone,
        }
        return [SeriesPoint(*row) for row in self._fetch("reading a series", sql, params)]

    def readings(
        self, device_id: str, start_ms: int, end_ms: int, metric: str | None = None
    ) -> list[Reading]:
        codes = list(ALL_METRIC_CODES) if metric is None else [metric_code(metric)]
        sql = f"""
            SELECT {_ms("ts")}, metric, value, quality, raw, anomaly FROM readings
            WHERE device_id = %s AND metric = ANY(%s::smallint[]) AND ts >= %s AND ts < %s
            ORDER BY ts, metric, seq
        """
        params = (device_id, codes, ms_to_ts(start_ms), ms_to_ts(end_ms))
        return [
            Reading(ts, metric_name(code), value, quality, raw, anomaly)
            for ts, code, value, quality, raw, anomaly in self._fetch(
                "reading raw readings", sql, params
            )
        ]

    def ledger(self, device_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[LedgerEntry]:
        sql = f"""
            SELECT device_id, seq, payload_hash, prev_hash, {_ms("sealed_at")}, gateway_id,
                   {_ms("received_at")}, {_ms("ingested_at")}, n_readings, device_message,
                   gateway_message
            FROM batches WHERE device_id = %s AND seq > %s ORDER BY seq LIMIT %s
        """
        rows = self._fetch("reading the ledger", sql, (device_id, after_seq, max(limit, 0)))
        return [
            LedgerEntry(
                dev, seq, bytes(ph), bytes(prev), sealed, gw, recv, ingested, n, bytes(dm),
                bytes(gm),
            )
            for dev, seq, ph, prev, sealed, gw, recv, ingested, n, dm, gm in rows
        ]  # fmt: skip

    def quarantined(self, limit: int = 100) -> list[QuarantineRecord]:
        sql = f"""
            SELECT reason, detail, source, topic, {_ms("received_at")}, payload_size,
                   payload_sha256, payload, device_id, seq
            FROM quarantine ORDER BY received_at DESC, id DESC LIMIT %s
        """
        rows = self._fetch("reading quarantine", sql, (max(limit, 0),))
        return [
            QuarantineRecord(
                reason=reason,
                detail=detail,
                source=source,
                topic=topic,
                received_at_ms=received,
                payload_size=size,
                payload_sha256=sha,
                payload_b64=payload_b64(bytes(payload)),
                device_id=device,
                seq=seq,
            )
            for reason, detail, source, topic, received, size, sha, payload, device, seq in rows
        ]

    # -- rollups --------------------------------------------------------------

    def refresh_rollups(self) -> int:
        if self.timescale:
            return self._refresh_continuous_aggregates()
        with self._transaction("refreshing rollups") as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (ROLLUP_LOCK,))
            row = cur.fetchone()
            if row is None or not row[0]:
                return 0  # another worker is refreshing; what it did not take stays
            cur.execute("DELETE FROM rollup_dirty RETURNING device_id, lo, hi")
            taken = [(d, _to_ms(lo), _to_ms(hi)) for d, lo, hi in cur.fetchall()]
            ranges = merge_ranges(taken)
            if not ranges:
                return 0
            # The aggregation sorts its input; give it room (live refreshes are small,
            # a bulk load's are not) and take the ranges a few devices at a time.
            cur.execute("SET LOCAL work_mem = '64MB'")
            for first in range(0, len(ranges), REFRESH_CHUNK):
                chunk = ranges[first : first + REFRESH_CHUNK]
                params = {
                    # Every metric named, so (device_id, metric, ts) is searched per
                    # metric over the range instead of over the device's whole history.
                    "codes": list(ALL_METRIC_CODES),
                    "devices": [d for d, _, _ in chunk],
                    "los": [ms_to_ts(lo) for _, lo, _ in chunk],
                    "his": [ms_to_ts(hi) for _, _, hi in chunk],
                }
                below = "readings"
                for resolution in ROLLUPS:
                    names = {
                        "step": f"interval '{resolution.seconds} seconds'",
                        "target": resolution.table,
                        "source": below,
                        "time": "ts" if below == "readings" else "bucket",
                        "aggregates": _FROM_READINGS if below == "readings" else _FROM_ROLLUP,
                    }
                    cur.execute(_RECOMPUTE_DELETE.format(**names), params)
                    cur.execute(_RECOMPUTE_INSERT.format(**names), params)
                    below = resolution.table
            self._refresh_zones(cur, ranges)
        return len(ranges)

    def _refresh_zones(
        self, cur: psycopg.Cursor[Any], ranges: Sequence[tuple[str, int, int]]
    ) -> None:
        """Recompute the zone rollups over the zones and windows ``ranges`` touched."""
        params = {
            "codes": list(ALL_METRIC_CODES),
            "devices": [d for d, _, _ in ranges],
            "los": [ms_to_ts(lo) for _, lo, _ in ranges],
            "his": [ms_to_ts(hi) for _, _, hi in ranges],
        }
        for resolution in ZONE_ROLLUPS:
            names = {
                "step": f"interval '{resolution.seconds} seconds'",
                "target": resolution.zone_table,
                "source": resolution.table,
            }
            cur.execute(_ZONE_DELETE.format(**names), params)
            cur.execute(_ZONE_INSERT.format(**names), params)

    def _refresh_continuous_aggregates(self) -> int:
        """Refresh the continuous aggregates over the windows written since last time.

        ``refresh_continuous_aggregate`` cannot run in a transaction block, so the dirty
        rows are read first and deleted only after every refresh succeeded."""
        conn = self._conn()
        try:
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (ROLLUP_LOCK,)).fetchone()
            if locked is None or not locked[0]:
                return 0
            try:
                rows = conn.execute("SELECT ctid, device_id, lo, hi FROM rollup_dirty").fetchall()
                if not rows:
                    return 0
                windows = merge_ranges(("", _to_ms(lo), _to_ms(hi)) for _, _, lo, hi in rows)
                for resolution in ROLLUPS:
                    step = resolution.seconds * 1000
                    for _, lo, hi in windows:
                        first, end = (lo // step) * step, (hi // step) * step + step
                        conn.execute(
                            "CALL refresh_continuous_aggregate("
                            "%s::regclass, %s::timestamptz, %s::timestamptz)",
                            (resolution.table, ms_to_ts(first), ms_to_ts(end)),
                        )
                with conn.transaction(), conn.cursor() as cur:
                    self._refresh_zones(
                        cur, merge_ranges((d, _to_ms(lo), _to_ms(hi)) for _, d, lo, hi in rows)
                    )
                    cur.execute(
                        "DELETE FROM rollup_dirty WHERE ctid = ANY(%s::tid[])",
                        ([str(ctid) for ctid, _, _, _ in rows],),
                    )
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (ROLLUP_LOCK,))
        except psycopg.Error as exc:
            raise self._failed(conn, "refreshing continuous aggregates", exc) from exc
        return len(windows)

    # -- upkeep ---------------------------------------------------------------

    def ensure_partitions_ahead(self, now_ms: int, weeks: int = 2) -> None:
        """Create this week's partition and the next ``weeks`` ones before data needs them."""
        if self.timescale:
            return
        start = partition_start(now_ms)
        with self._lock:
            missing = [
                start + PARTITION_SPAN * i
                for i in range(weeks + 1)
                if start + PARTITION_SPAN * i not in self._partitions
            ]
        if missing:
            self._create_partitions(missing)

    def apply_retention(self, now_ms: int, policy: RetentionPolicy) -> dict[str, int]:
        if self.timescale:
            return {}  # retention policies (see configure) drop whole chunks themselves
        dropped: dict[str, int] = {}
        if policy.raw_days is not None:
            cutoff = now_ms - int(policy.raw_days * 86_400_000)
            # Whole weeks only: a partition goes once all of it is older than the cutoff.
            old = [
                name
                for name in self.partitions()
                if name != "readings_default"
                and _partition_date(name) + PARTITION_SPAN <= ms_to_ts(cutoff).date()
            ]
            with self._transaction("dropping old readings partitions") as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                for name in old:
                    cur.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(pgsql.Identifier(name)))
            with self._lock:
                self._partitions -= {_partition_date(name) for name in old}
            dropped["readings_partitions"] = len(old)
            if old:
                log.info("%r: retention dropped partitions %s", self, ", ".join(old))
        for resolution, days in zip(
            ROLLUPS,
            (policy.rollup_1m_days, policy.rollup_1h_days, policy.rollup_1d_days),
            strict=True,
        ):
            if days is None:
                continue
            cutoff_ts = ms_to_ts(now_ms - int(days * 86_400_000))
            with self._transaction(f"retention on {resolution.table}") as cur:
                cur.execute(
                    pgsql.SQL("DELETE FROM {} WHERE bucket < %s").format(
                        pgsql.Identifier(resolution.table)
                    ),
                    (cutoff_ts,),
                )
                dropped[resolution.table] = cur.rowcount
        return dropped

    def counts(self) -> StoreCounts:
        # Readings are counted from the ledger (written together, atomically): far
        # cheaper than count(*) over a partitioned table of billions of rows.
        sql = """
            SELECT (SELECT count(*) FROM batches),
                   (SELECT coalesce(sum(n_readings), 0) FROM batches),
                   (SELECT count(*) FROM quarantine)
        """
        (row,) = self._fetch("counting", sql)
        return StoreCounts(int(row[0]), int(row[1]), int(row[2]))
