"""Central store on PostgreSQL (psycopg 3): partitioned readings, COPY on the hot path.

Each thread gets its own connection (autocommit; transactions are explicit). Readings
are range-partitioned by week on ``ts``; the partitions a write needs are created just
before its transaction, in a short transaction of their own, so the exclusive lock that
creating a partition takes on ``readings`` is held for milliseconds, not for a whole write.
"""

from __future__ import annotations

import logging
import re
import threading
import time
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
    DEFAULT_STORAGE_POLICY,
    ROLLUPS,
    ZONE_ROLLUPS,
    DeviceStatus,
    LatestReading,
    Resolution,
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
from analytics.store.pgcopy import encode_readings
from analytics.store.schema import NO_TRANSACTION, Migration, load_migrations, split_statements
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
CONFIGURE_LOCK = 0x63_6D_73_74_04
REFRESH_CHUNK = 8  # device ranges per refresh statement
REFRESH_ATTEMPTS = 20  # a continuous aggregate busy with its policy's refresh: ~15 s
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


# Placeholder in the TimescaleDB migrations for the (quoted) schema of the extension.
TIMESCALEDB_SCHEMA_PLACEHOLDER = "@timescaledb@"
PRELOAD_FIX = (
    "add timescaledb to shared_preload_libraries in postgresql.conf (or run ALTER SYSTEM "
    "SET shared_preload_libraries = 'timescaledb' as a superuser) and restart PostgreSQL"
)
_PRELOADED = re.compile(r"(^|[\s,/\"])timescaledb(\.so)?([\s,\"]|$)")
# Servers already warned that TimescaleDB is installed but not preloaded: one warning per
# server and process, however many stores (ingest workers, API) open it.
_WARNED_NOT_PRELOADED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def timescaledb_preloaded(shared_preload_libraries: str) -> bool:
    """Whether a ``shared_preload_libraries`` value loads TimescaleDB."""
    return _PRELOADED.search(shared_preload_libraries) is not None


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


def _partition_date(name: str) -> date:
    return datetime.strptime(name.removeprefix("readings_w"), "%Y%m%d").date()


def _to_ms(ts: datetime) -> int:
    return (ts - EPOCH) // _ONE_MS


class PostgresStore(SqlRollupQueries):
    """Store on a PostgreSQL server; safe to share between threads (one connection each)."""

    backend = "postgresql"

    def __init__(
        self, conninfo: str, *, timescaledb: str = "auto", policy: StoragePolicy | None = None
    ) -> None:
        if timescaledb not in ("auto", "require", "off"):
            raise StoreError(f"timescaledb must be auto, require or off, not {timescaledb!r}")
        self._timescale_mode = timescaledb
        self.timescale = False  # decided by migrate(): the TimescaleDB path is active
        self.timescale_schema = "public"  # where the extension lives (decided by migrate())
        # Chunking, compression and retention the TimescaleDB path sets up itself in
        # migrate() (configure() changes them later).
        self.policy = policy or DEFAULT_STORAGE_POLICY
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
        """Pick the path (TimescaleDB when the extension is installed and preloaded, see
        :meth:`_choose_path`), apply its pending migrations and set up its policies.

        Stores starting at once (several ingest workers, the API) take turns on an
        advisory lock held for the whole call: one applies everything, the others find
        nothing left to do."""
        conn = self._conn()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        except psycopg.Error as exc:
            raise self._failed(conn, "migration", exc) from exc
        try:
            return self._migrate_locked()
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))

    def _migrate_locked(self) -> list[str]:
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
                cur.execute(self._migration_sql(migration).encode("utf-8"))
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied_now.append(migration.name)
        for migration in deferred:
            name = self._migrate_outside_transaction(migration)
            if name is not None:  # None: another store applied it while this one waited
                applied_now.append(name)
        if deferred:
            applied_now += self._migrate_locked()  # whatever followed the deferred ones
        else:
            # The path's own policies (chunks, compression, retention): set up by the store
            # itself, so a store built any way has them; unchanged settings change nothing.
            self.configure(self.policy)
        if applied_now:
            log.info("%r: applied migrations %s", self, ", ".join(applied_now))
        return applied_now

    def _migration_sql(self, migration: Migration) -> str:
        if self.backend != "timescaledb":
            return migration.sql
        return migration.sql.replace(TIMESCALEDB_SCHEMA_PLACEHOLDER, self._ts_schema_sql())

    def _ts_schema_sql(self) -> str:
        return '"' + self.timescale_schema.replace('"', '""') + '"'

    def _ts(self, function: str) -> str:
        """A TimescaleDB function or procedure, qualified with the extension's schema."""
        return f"{self._ts_schema_sql()}.{function}"

    def _choose_path(self, cur: psycopg.Cursor[Any], fresh: bool) -> None:
        """TimescaleDB or plain PostgreSQL, decided once per schema and logged.

        An existing schema keeps its path (readings is a hypertable or it is not). A new
        one takes TimescaleDB when the extension is installed *and* preloaded, unless
        configured ``off``: installed but not preloaded (right after the package install,
        before the restart) ``auto`` warns once with the fix and takes the plain path,
        ``require`` refuses with the same fix. The extension is created once per database
        (in ``public`` unless it exists elsewhere already) and every call is qualified.
        """
        cur.execute(
            "SELECT e.extversion, n.nspname FROM pg_extension e"
            " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'timescaledb'"
        )
        installed = cur.fetchone()
        cur.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        available = cur.fetchone()
        cur.execute("SELECT current_setting('shared_preload_libraries')")
        row = cur.fetchone()
        preloaded = row is not None and timescaledb_preloaded(str(row[0]))
        version = installed[0] if installed is not None else available[0] if available else None
        if not fresh:
            timescale = False
            if installed is not None:
                cur.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables"
                    " WHERE hypertable_name = 'readings' AND hypertable_schema = current_schema()"
                )
                timescale = cur.fetchone() is not None
            if timescale and not preloaded:
                raise StoreError(
                    f"{self!r}: this schema is on the TimescaleDB path but the server does not "
                    f"preload TimescaleDB {version}; {PRELOAD_FIX}"
                )
        elif self._timescale_mode == "off" or available is None:
            timescale = False
        elif not preloaded:
            if self._timescale_mode == "require":
                raise StoreError(
                    f"{self!r}: storage.timescaledb is 'require' but TimescaleDB {version} is "
                    f"installed and not preloaded; {PRELOAD_FIX} (or set storage.timescaledb "
                    "to 'auto' to use plain PostgreSQL)"
                )
            self._warn_not_preloaded(str(version))
            timescale = False
        else:
            timescale = True
        if self._timescale_mode == "require" and not timescale:
            raise StoreError(
                f"{self!r}: storage.timescaledb is 'require' but the TimescaleDB path is not "
                "available: "
                + (
                    "TimescaleDB is not installed on this server (install the "
                    "timescaledb-2-postgresql package for this PostgreSQL, then "
                    f"{PRELOAD_FIX})"
                    if available is None
                    else "this schema was created on the plain path (a schema keeps its path)"
                )
            )
        if timescale:
            if installed is None:
                # Once per database; the migration lock serialises concurrent stores.
                cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public")
                self.timescale_schema = "public"
            else:
                self.timescale_schema = str(installed[1])
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

    def _warn_not_preloaded(self, version: str) -> None:
        try:
            params = conninfo_to_dict(self._conninfo)
        except psycopg.ProgrammingError:
            params = {}
        server = f"{params.get('host')}:{params.get('port')}"
        with _WARNED_LOCK:
            if server in _WARNED_NOT_PRELOADED:
                return
            _WARNED_NOT_PRELOADED.add(server)
        log.warning(
            "TimescaleDB %s is installed on %s but not preloaded, so new schemas take the "
            "plain PostgreSQL path; to use TimescaleDB, %s",
            version,
            server,
            PRELOAD_FIX,
        )

    def _migrate_outside_transaction(self, migration: Migration) -> str | None:
        """Run a migration statement by statement in autocommit mode (TimescaleDB's
        continuous aggregates refuse to be created inside a transaction block). Its
        statements are idempotent, so a run cut short can be repeated. None when another
        store applied it first."""
        conn = self._conn()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                row = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                ).fetchone()
                if row is not None:
                    return None
                for statement in split_statements(self._migration_sql(migration)):
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
        """Apply the TimescaleDB policies: chunk interval, compression and retention per
        level. Idempotent and safe to run from several processes at once (an advisory
        lock): a policy is changed only when its setting changed. The plain path needs
        nothing here (:meth:`apply_retention` keeps it)."""
        self.policy = settings
        if not self.timescale:
            return
        conn = self._conn()
        chunk = timedelta(hours=settings.chunk_hours)
        changed: list[str] = []
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (CONFIGURE_LOCK,))
            try:
                row = conn.execute(
                    "SELECT time_interval FROM timescaledb_information.dimensions"
                    " WHERE hypertable_schema = current_schema() AND hypertable_name = 'readings'"
                    " AND column_name = 'ts'"
                ).fetchone()
                if row is None or row[0] != chunk:
                    conn.execute(
                        f"SELECT {self._ts('set_chunk_time_interval')}('readings', %s::interval)",
                        (chunk,),
                    )
                    changed.append(f"chunk interval {chunk}")
                compress = timedelta(days=settings.compress_after_days)
                if self._set_policy(conn, "compression", "readings", "compress_after", compress):
                    changed.append(f"compression after {compress}")
                for relation, days in (
                    ("readings", settings.retention.raw_days),
                    ("rollup_1m", settings.retention.rollup_1m_days),
                    ("rollup_1h", settings.retention.rollup_1h_days),
                    ("rollup_1d", settings.retention.rollup_1d_days),
                ):
                    keep = None if days is None else timedelta(days=days)
                    if self._set_policy(conn, "retention", relation, "drop_after", keep):
                        changed.append(f"retention of {relation} {keep or 'forever'}")
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (CONFIGURE_LOCK,))
        except psycopg.Error as exc:
            raise self._failed(conn, "configuring TimescaleDB policies", exc) from exc
        if changed:
            log.info("%r: TimescaleDB policies set: %s", self, "; ".join(changed))

    def _set_policy(
        self,
        conn: psycopg.Connection[Any],
        kind: str,
        relation: str,
        key: str,
        interval: timedelta | None,
    ) -> bool:
        """Make ``relation``'s ``kind`` policy (compression or retention) have ``key`` =
        ``interval`` (None: no policy); whether anything changed."""
        rows = conn.execute(
            "SELECT (config ->> %s)::interval FROM timescaledb_information.jobs"
            " WHERE proc_name = %s AND hypertable_schema = current_schema()"
            " AND hypertable_name = %s",
            (key, f"policy_{kind}", relation),
        ).fetchall()
        if len(rows) == 1 and rows[0][0] == interval:
            return False
        if not rows and interval is None:
            return False
        if rows:
            conn.execute(
                f"SELECT {self._ts(f'remove_{kind}_policy')}(%s::regclass, if_exists => true)",
                (relation,),
            )
        if interval is not None:
            conn.execute(
                f"SELECT {self._ts(f'add_{kind}_policy')}(%s::regclass, %s::interval)",
                (relation, interval),
            )
        return True

    def partitions(self) -> list[str]:
        """Names of the readings partitions, oldest first (the DEFAULT one last); on
        TimescaleDB, its chunks."""
        if self.timescale:
            return [
                str(name)
                for (name,) in self._fetch(
                    "listing chunks", f"SELECT {self._ts('show_chunks')}('readings')"
                )
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

    # -- rollups --------------------------------------------------------------

    def refresh_rollups(self) -> int:
        """Rebuild the rollups over the ranges written since the last refresh; how many
        (device, time range) pieces were refreshed (the same count on both paths)."""
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
            horizons = self._horizons(cur)
            cur.execute(IMPORTER_IDS)
            importers = {str(d) for (d,) in cur.fetchall()}
            by_kind = {kind: horizons_for(horizons, kind) for kind in (False, True)}
            # The aggregation sorts its input; give it room (live refreshes are small,
            # a bulk load's are not) and take the ranges a few devices at a time.
            cur.execute("SET LOCAL work_mem = '64MB'")
            skipped: dict[str, int] = {}
            for first in range(0, len(ranges), REFRESH_CHUNK):
                chunk = ranges[first : first + REFRESH_CHUNK]
                for level, resolution in enumerate(ROLLUPS):
                    # Rebuilt from the level below where it is complete, else from a finer
                    # one (down to the readings); buckets no source holds whole are kept.
                    finer = [r.table for r in reversed(ROLLUPS[:level])] + [RAW_SOURCE]
                    pieces: dict[str, list[tuple[str, int, int]]] = {}
                    for device, lo, hi in chunk:
                        own = by_kind[device in importers]
                        sources = [(name, own.get(name)) for name in finer]
                        plan, lost = rebuild_plan(lo, hi, resolution.seconds * 1000, sources)
                        for source, piece_lo, piece_hi in plan:
                            pieces.setdefault(source, []).append((device, piece_lo, piece_hi))
                        if lost:
                            skipped[resolution.table] = skipped.get(resolution.table, 0) + 1
                    self._recompute(cur, resolution, pieces)
            self._refresh_zones(cur, ranges, horizons)
        if skipped:
            self._warn_past_retention(skipped)
        return len(ranges)

    def _recompute(
        self,
        cur: psycopg.Cursor[Any],
        resolution: Resolution,
        pieces: dict[str, list[tuple[str, int, int]]],
    ) -> None:
        """Delete ``resolution``'s buckets in every piece, then aggregate each piece again
        from its source. Pieces are bucket-aligned ``[lo, hi)``."""
        every = [piece for source_pieces in pieces.values() for piece in source_pieces]
        if not every:
            return

        def params(chosen: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
            return {
                # Every metric named, so (device_id, metric, ts) is searched per metric over
                # the range instead of over the device's whole history.
                "codes": list(ALL_METRIC_CODES),
                "devices": [d for d, _, _ in chosen],
                "los": [ms_to_ts(lo) for _, lo, _ in chosen],
                # _RANGES rounds hi down to its bucket and adds one step: the last ms in.
                "his": [ms_to_ts(hi - 1) for _, _, hi in chosen],
            }

        step = f"interval '{resolution.seconds} seconds'"
        cur.execute(_RECOMPUTE_DELETE.format(step=step, target=resolution.table), params(every))
        for source, chosen in pieces.items():
            raw = source == RAW_SOURCE
            names = {
                "step": step,
                "target": resolution.table,
                "source": source,
                "time": "ts" if raw else "bucket",
                "aggregates": _FROM_READINGS if raw else _FROM_ROLLUP,
            }
            cur.execute(_RECOMPUTE_INSERT.format(**names), params(chosen))

    def _horizons(self, cur: psycopg.Cursor[Any]) -> dict[str, int]:
        """Per relation, the time (ms) before which retention may have dropped its data:
        what :meth:`apply_retention` recorded and, on TimescaleDB, what the retention jobs
        may have dropped since (now - drop_after)."""
        cur.execute("SELECT relation, horizon FROM retention_horizons")
        horizons = {str(relation): _to_ms(horizon) for relation, horizon in cur.fetchall()}
        if self.timescale:
            cur.execute(
                "SELECT hypertable_name, now() - (config ->> 'drop_after')::interval"
                " FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'"
                " AND hypertable_schema = current_schema()"
            )
            for relation, horizon in cur.fetchall():
                ms = _to_ms(horizon)
                horizons[str(relation)] = max(horizons.get(str(relation), ms), ms)
        return horizons

    def _refresh_window(
        self,
        conn: psycopg.Connection[Any],
        refresh: str,
        table: str,
        first: datetime,
        end: datetime,
    ) -> None:
        """One ``refresh_continuous_aggregate`` call. The aggregate's own refresh policy
        may be refreshing an overlapping window right then (TimescaleDB refuses a second
        one "due to a concurrent refresh"): wait for it and try again."""
        delay = 0.05
        for attempt in range(REFRESH_ATTEMPTS):
            try:
                conn.execute(
                    refresh + "%s::regclass, %s::timestamptz, %s::timestamptz)",
                    (table, first, end),
                )
                return
            except psycopg.Error as exc:
                if "concurrent refresh" not in str(exc) or attempt == REFRESH_ATTEMPTS - 1:
                    raise
                log.debug("%r: %s busy (%s); retrying", self, table, exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _warn_past_retention(self, skipped: dict[str, int]) -> None:
        log.warning(
            "%r: late data older than a retention: buckets kept as they were (their source "
            "no longer holds all of their data) in %s; the readings themselves are stored",
            self,
            ", ".join(f"{table} ({n} ranges)" for table, n in sorted(skipped.items())),
        )

    def _refresh_zones(
        self,
        cur: psycopg.Cursor[Any],
        ranges: Sequence[tuple[str, int, int]],
        horizons: dict[str, int],
    ) -> None:
        """Recompute the zone rollups over the zones and windows ``ranges`` touched, where
        the device rollup they sum is complete."""
        cur.execute("SELECT device_id, zone FROM devices")
        zone_of = {str(d): str(z) for d, z in cur.fetchall()}
        cur.execute("SELECT DISTINCT zone FROM devices WHERE kind <> 'import'")
        mixed = {str(z) for (z,) in cur.fetchall()}
        for resolution in ZONE_ROLLUPS:
            step = resolution.seconds * 1000

            def start(device: str, lo: int, table: str = resolution.table, step: int = step) -> int:
                only_imported = zone_of.get(device) not in mixed
                horizon = zone_horizons(horizons, only_imported).get(table)
                return lo if horizon is None else max(lo, -(-horizon // step) * step)

            kept = [(d, start(d, lo), hi) for d, lo, hi in ranges]
            kept = [(d, lo, hi) for d, lo, hi in kept if lo <= hi]
            if not kept:
                continue
            params = {
                "codes": list(ALL_METRIC_CODES),
                "devices": [d for d, _, _ in kept],
                "los": [ms_to_ts(lo) for _, lo, _ in kept],
                "his": [ms_to_ts(hi) for _, _, hi in kept],
            }
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
        rows are read first and deleted only after every refresh succeeded. A level is
        refreshed only where the level below it is complete: a continuous aggregate
        refreshed over a window whose source was dropped by retention would replace its
        correct buckets with partial ones (late data there stays in the readings only)."""
        conn = self._conn()
        refresh = f"CALL {self._ts('refresh_continuous_aggregate')}("
        skipped: dict[str, int] = {}
        try:
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (ROLLUP_LOCK,)).fetchone()
            if locked is None or not locked[0]:
                return 0
            try:
                rows = conn.execute("SELECT ctid, device_id, lo, hi FROM rollup_dirty").fetchall()
                if not rows:
                    return 0
                ranges = merge_ranges((d, _to_ms(lo), _to_ms(hi)) for _, d, lo, hi in rows)
                windows = merge_ranges(("", _to_ms(lo), _to_ms(hi)) for _, _, lo, hi in rows)
                with conn.cursor() as cur:
                    horizons = self._horizons(cur)
                for level, resolution in enumerate(ROLLUPS):
                    source = RAW_SOURCE if level == 0 else ROLLUPS[level - 1].table
                    step = resolution.seconds * 1000
                    for _, lo, hi in windows:
                        plan, lost = rebuild_plan(lo, hi, step, [(source, horizons.get(source))])
                        if lost:
                            skipped[resolution.table] = skipped.get(resolution.table, 0) + 1
                        for _, first, end in plan:
                            self._refresh_window(
                                conn, refresh, resolution.table, ms_to_ts(first), ms_to_ts(end)
                            )
                with conn.transaction(), conn.cursor() as cur:
                    self._refresh_zones(cur, ranges, horizons)
                    cur.execute(
                        "DELETE FROM rollup_dirty WHERE ctid = ANY(%s::tid[])",
                        ([str(ctid) for ctid, _, _, _ in rows],),
                    )
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (ROLLUP_LOCK,))
        except psycopg.Error as exc:
            raise self._failed(conn, "refreshing continuous aggregates", exc) from exc
        if skipped:
            self._warn_past_retention(skipped)
        return len(ranges)

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
        """Drop what the policy no longer keeps, now; the same keys on both paths:
        ``readings_partitions`` (weekly partitions, or TimescaleDB chunks, dropped whole)
        and, per rollup level with a retention, the rows dropped. Each cutoff is recorded
        (``retention_horizons``) so that late data is never rolled up from a level that
        no longer holds all of a bucket. On TimescaleDB the retention policies do the
        same by themselves; this runs them at once."""
        if self.timescale:
            return self._drop_chunks(now_ms, policy)
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
            kept: list[str] = []  # partitions holding imported history: trimmed, not dropped
            with self._transaction("dropping old readings partitions") as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                for name in old:
                    if not policy.include_imported and self._holds_imported(cur, name):
                        cur.execute(
                            pgsql.SQL(
                                "DELETE FROM {} WHERE device_id NOT IN (" + IMPORTER_IDS + ")"
                            ).format(pgsql.Identifier(name))
                        )
                        kept.append(name)
                        continue
                    cur.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(pgsql.Identifier(name)))
                if old:
                    end = max(_partition_date(name) for name in old) + PARTITION_SPAN
                    horizon = datetime(end.year, end.month, end.day, tzinfo=UTC)
                    self._record_horizon(cur, RAW_SOURCE, horizon)
                    if policy.include_imported:
                        self._record_horizon(cur, RAW_SOURCE + IMPORTED_SUFFIX, horizon)
            old = [name for name in old if name not in kept]
            with self._lock:
                self._partitions -= {_partition_date(name) for name in old}
            dropped["readings_partitions"] = len(old)
            if kept:
                dropped["readings_partitions_trimmed"] = len(kept)
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
            # Imported history stays unless the policy includes it.
            spare = (
                "" if policy.include_imported else " AND device_id NOT IN (" + IMPORTER_IDS + ")"
            )
            with self._transaction(f"retention on {resolution.table}") as cur:
                cur.execute(
                    pgsql.SQL("DELETE FROM {} WHERE bucket < %s" + spare).format(
                        pgsql.Identifier(resolution.table)
                    ),
                    (cutoff_ts,),
                )
                dropped[resolution.table] = cur.rowcount
                self._record_horizon(cur, resolution.table, cutoff_ts)
                if policy.include_imported:
                    self._record_horizon(cur, resolution.table + IMPORTED_SUFFIX, cutoff_ts)
        return dropped

    @staticmethod
    def _holds_imported(cur: psycopg.Cursor[Any], partition: str) -> bool:
        cur.execute(
            pgsql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE device_id IN (" + IMPORTER_IDS + "))"
            ).format(pgsql.Identifier(partition))
        )
        row = cur.fetchone()
        return bool(row and row[0])

    def _record_horizon(self, cur: psycopg.Cursor[Any], relation: str, horizon: datetime) -> None:
        cur.execute(
            "INSERT INTO retention_horizons (relation, horizon) VALUES (%s, %s)"
            " ON CONFLICT (relation) DO UPDATE"
            " SET horizon = greatest(retention_horizons.horizon, excluded.horizon)",
            (relation, horizon),
        )

    def _drop_chunks(self, now_ms: int, policy: RetentionPolicy) -> dict[str, int]:
        """TimescaleDB: drop the chunks wholly older than each cutoff (what the retention
        policies do on their schedule)."""
        dropped: dict[str, int] = {}
        for relation, days in (
            (RAW_SOURCE, policy.raw_days),
            *zip(
                (r.table for r in ROLLUPS),
                (policy.rollup_1m_days, policy.rollup_1h_days, policy.rollup_1d_days),
                strict=True,
            ),
        ):
            if days is None:
                continue
            cutoff = ms_to_ts(now_ms - int(days * 86_400_000))
            with self._transaction(f"retention on {relation}") as cur:
                cur.execute(
                    f"SELECT {self._ts('show_chunks')}(%s::regclass, older_than => %s)",
                    (relation, cutoff),
                )
                chunks = [str(name) for (name,) in cur.fetchall()]
                rows = 0
                if relation != RAW_SOURCE:
                    for chunk in chunks:
                        cur.execute(f"SELECT count(*) FROM {chunk}")  # a regclass, quoted
                        (count,) = cur.fetchone() or (0,)
                        rows += int(count)
                if chunks:
                    cur.execute(
                        f"SELECT {self._ts('drop_chunks')}(%s::regclass, older_than => %s)",
                        (relation, cutoff),
                    )
                self._record_horizon(cur, relation, cutoff)
            dropped["readings_partitions" if relation == RAW_SOURCE else relation] = (
                len(chunks) if relation == RAW_SOURCE else rows
            )
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

    # -- status ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``civicmesh db status`` shows (see :mod:`analytics.store.status`); reads
        only, migrates nothing."""
        return self._read("reading the store status", self._status)

    def _status(self, cur: psycopg.Cursor[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "postgresql", "warnings": []}
        cur.execute(
            "SELECT e.extversion, n.nspname, current_setting('shared_preload_libraries')"
            " FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'timescaledb'"
        )
        extension = cur.fetchone()
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cur.fetchone()
        if row is None or not row[0]:
            out["warnings"].append("the store is not migrated yet: run civicmesh db migrate")
            return out
        cur.execute("SELECT version, name FROM schema_migrations ORDER BY version DESC LIMIT 1")
        version = cur.fetchone()
        if version is not None:
            out["schema_version"], out["schema_name"] = version
        cur.execute(
            "SELECT (SELECT count(*) FROM batches),"
            " (SELECT coalesce(sum(n_readings), 0) FROM batches), (SELECT count(*) FROM quarantine)"
        )
        batches, readings, quarantined = cur.fetchone() or (0, 0, 0)
        out["counts"] = {
            "batches": int(batches),
            "readings": int(readings),
            "quarantined": int(quarantined),
        }
        cur.execute("SELECT to_regclass('retention_horizons') IS NOT NULL")
        row = cur.fetchone()
        if row is not None and row[0]:
            cur.execute("SELECT relation, horizon FROM retention_horizons")
            out["retention_horizons"] = dict(cur.fetchall())
        hypertable = False
        if extension is not None:
            cur.execute(
                "SELECT 1 FROM timescaledb_information.hypertables"
                " WHERE hypertable_name = 'readings' AND hypertable_schema = current_schema()"
            )
            hypertable = cur.fetchone() is not None
        if not hypertable:
            cur.execute(
                "SELECT default_version, current_setting('shared_preload_libraries')"
                " FROM pg_available_extensions WHERE name = 'timescaledb'"
            )
            available = cur.fetchone()
            if available is not None and not timescaledb_preloaded(str(available[1])):
                out["warnings"].append(
                    f"TimescaleDB {available[0]} is installed but not preloaded (this schema is "
                    f"on the plain path and stays there); for new stores: {PRELOAD_FIX}"
                )
            cur.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'readings'::regclass ORDER BY c.relname = 'readings_default',"
                " c.relname"
            )
            out["partitions"] = [name for (name,) in cur.fetchall()]
            return out
        assert extension is not None
        out["backend"] = "timescaledb"
        version_, schema, preload = extension
        out["timescaledb"] = {
            "version": version_,
            "schema": schema,
            "preloaded": timescaledb_preloaded(str(preload)),
            "hypertables": self._status_hypertables(cur, str(schema)),
            "jobs": self._status_jobs(cur),
        }
        if not out["timescaledb"]["preloaded"]:
            out["warnings"].append(f"TimescaleDB is not preloaded: {PRELOAD_FIX}")
        return out

    def _status_hypertables(self, cur: psycopg.Cursor[Any], schema: str) -> list[dict[str, Any]]:
        ts = '"' + schema.replace('"', '""') + '"'
        found: list[dict[str, Any]] = []
        cur.execute(
            "SELECT hypertable_name::text, hypertable_schema::text, hypertable_name::text"
            " FROM timescaledb_information.hypertables WHERE hypertable_schema = current_schema()"
            " UNION ALL SELECT view_name::text, materialization_hypertable_schema::text,"
            " materialization_hypertable_name::text"
            " FROM timescaledb_information.continuous_aggregates"
            " WHERE view_schema = current_schema() ORDER BY 1"
        )
        for name, hyper_schema, hyper_name in cur.fetchall():
            relation = pgsql.Identifier(hyper_schema, hyper_name).as_string(cur.connection)
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE is_compressed), min(range_start)"
                " FROM timescaledb_information.chunks"
                " WHERE hypertable_schema = %s AND hypertable_name = %s",
                (hyper_schema, hyper_name),
            )
            chunks, compressed, oldest = cur.fetchone() or (0, 0, None)
            cur.execute(f"SELECT {ts}.hypertable_size(%s::regclass)", (relation,))
            (size,) = cur.fetchone() or (None,)
            entry: dict[str, Any] = {
                "name": name,
                "chunks": int(chunks),
                "compressed_chunks": int(compressed),
                "oldest_chunk": oldest,
                "total_bytes": None if size is None else int(size),
            }
            if compressed:
                cur.execute(
                    "SELECT sum(before_compression_total_bytes),"
                    " sum(after_compression_total_bytes)"
                    f" FROM {ts}.hypertable_compression_stats(%s::regclass)",
                    (relation,),
                )
                before, after = cur.fetchone() or (None, None)
                entry["before_compression_bytes"] = None if before is None else int(before)
                entry["after_compression_bytes"] = None if after is None else int(after)
            found.append(entry)
        return found

    def _status_jobs(self, cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
        cur.execute(
            "SELECT j.job_id, j.proc_name, j.hypertable_name, j.schedule_interval, j.config,"
            # -infinity (never run, not scheduled) has no Python datetime
            " CASE WHEN isfinite(j.next_start) THEN j.next_start END,"
            " CASE WHEN isfinite(s.last_run_started_at) THEN s.last_run_started_at END,"
            " s.last_run_status, s.total_runs,"
            " s.total_failures,"
            " (SELECT e.err_message FROM timescaledb_information.job_errors e"
            "  WHERE e.job_id = j.job_id ORDER BY e.start_time DESC LIMIT 1)"
            " FROM timescaledb_information.jobs j"
            " LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id"
            " WHERE j.hypertable_schema = current_schema() ORDER BY j.job_id"
        )
        jobs = []
        for (job_id, proc, relation, every, config, next_start, started, result, runs, failures,
             error) in cur.fetchall():  # fmt: skip
            kind = str(proc).removeprefix("policy_")
            config = {
                k: v
                for k, v in (config or {}).items()
                if k not in ("hypertable_id", "mat_hypertable_id")
            }
            jobs.append(
                {
                    "job_id": job_id,
                    "kind": kind,
                    "relation": relation,
                    "schedule_interval": every,
                    "config": config,
                    "next_start": next_start,
                    "last_run_started_at": started,
                    "last_run_status": result,
                    "total_runs": runs,
                    "total_failures": failures,
                    "last_error": error,
                    "effect": self._job_effect(cur, kind, str(relation), config),
                }
            )
        return jobs

    def _job_effect(
        self, cur: psycopg.Cursor[Any], kind: str, relation: str, config: dict[str, Any]
    ) -> str | None:
        """What a policy has visibly done (its recorded result is not to be trusted)."""
        chunks_of = (
            "FROM timescaledb_information.chunks c WHERE (c.hypertable_schema,"
            " c.hypertable_name) IN (SELECT current_schema()::name, %(rel)s::name UNION ALL"
            " SELECT materialization_hypertable_schema, materialization_hypertable_name"
            " FROM timescaledb_information.continuous_aggregates"
            " WHERE view_schema = current_schema() AND view_name = %(rel)s)"
        )
        if kind == "compression" and "compress_after" in config:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE c.is_compressed) "
                + chunks_of
                + " AND c.range_end < now() - %(after)s::interval",
                {"rel": relation, "after": config["compress_after"]},
            )
            due, done = cur.fetchone() or (0, 0)
            return f"{done} of {due} chunks older than {config['compress_after']} are compressed"
        if kind == "retention" and "drop_after" in config:
            cur.execute(
                "SELECT count(*) " + chunks_of + " AND c.range_end < now() - %(after)s::interval",
                {"rel": relation, "after": config["drop_after"]},
            )
            (left,) = cur.fetchone() or (0,)
            if not left:
                return f"no chunk wholly older than {config['drop_after']} is left"
            return f"{left} chunks wholly older than {config['drop_after']} are still there"
        if kind == "refresh_continuous_aggregate":
            cur.execute(
                "SELECT materialization_hypertable_schema, materialization_hypertable_name"
                " FROM timescaledb_information.continuous_aggregates"
                " WHERE view_schema = current_schema() AND view_name = %s",
                (relation,),
            )
            mat = cur.fetchone()
            if mat is None:
                return None
            cur.execute(pgsql.SQL("SELECT max(bucket) FROM {}").format(pgsql.Identifier(*mat)))
            row = cur.fetchone()
            newest = row[0] if row else None
            return (
                "nothing materialized yet"
                if newest is None
                else f"materialized up to the bucket of {newest:%Y-%m-%d %H:%M %Z}"
            )
        return None
