"""The alert log: open and past alerts and the delivery queue, in one SQLite file.

Why a file of its own rather than tables in the central store: alert state is small and
written by one evaluator, the API only reads it, and a local SQLite file needs no
migration on three store backends. It survives restarts: an alert and the deliveries it
owes are written in one transaction (a transactional outbox), so a crash leaves both or
neither, and a delivery is marked done only after its receiver said 2xx. A partial unique
index keeps one open alert per (rule, subject) even when two evaluators share the file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicmesh.errors import CivicmeshError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    rule_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    subject TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'resolved')),
    since_ms INTEGER NOT NULL,
    opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    resolved_ms INTEGER,
    summary TEXT NOT NULL,
    evidence_json TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    link TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open
    ON alerts (rule_id, subject) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS alerts_by_rule_subject ON alerts (rule_id, subject, id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts (id),
    event TEXT NOT NULL CHECK (event IN ('firing', 'resolved')),
    contact_point TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    delivered_ms INTEGER,
    gave_up_ms INTEGER,
    last_error TEXT,
    UNIQUE (alert_id, event, contact_point)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_ms)
    WHERE delivered_ms IS NULL AND gave_up_ms IS NULL;
"""


class AlertStateError(CivicmeshError):
    reason = "alerts.state"


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    rule_id: str
    kind: str
    severity: str
    subject: str
    state: str  # "open" or "resolved"
    since_ms: int
    opened_ms: int
    updated_ms: int
    resolved_ms: int | None
    summary: str
    evidence: dict[str, Any]
    start_ms: int
    end_ms: int
    link: str


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    alert_id: int
    event: str
    contact_point: str
    body: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryCounts:
    pending: int
    delivered: int
    gave_up: int


_ALERT_COLUMNS = (
    "id, rule_id, kind, severity, subject, state, since_ms, opened_ms, updated_ms, "
    "resolved_ms, summary, evidence_json, start_ms, end_ms, link"
)


def _alert(row: sqlite3.Row | tuple[Any, ...]) -> AlertRecord:
    values = list(row)
    values[11] = json.loads(values[11])
    return AlertRecord(*values)


class AlertLog:
    """The state file. One connection per instance, guarded by a lock, so the evaluator,
    the delivery thread and the API's thread pool may share one."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if readonly:
                uri = f"file:{path}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise AlertStateError(f"cannot open the alert state file {path}: {exc}") from None
        self._conn.isolation_level = None  # explicit BEGIN IMMEDIATE below

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: two evaluators on one file take turns, never interleave."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise AlertStateError(f"alert state file {self.path}: {exc}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise AlertStateError(f"alert state file {self.path}: {exc}") from None

    # -- reads ----------------------------------------------------------------

    def open_alerts(self) -> list[AlertRecord]:
        rows = self._query(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE state = 'open' ORDER BY opened_ms, id"
        )
        return [_alert(r) for r in rows]

    def recent(self, since_ms: int, limit: int = 100) -> list[AlertRecord]:
        """Alerts resolved at or after ``since_ms``, newest first."""
        rows = self._query(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE state = 'resolved' AND resolved_ms >= ? "
            "ORDER BY resolved_ms DESC, id DESC LIMIT ?",
            (since_ms, limit),
        )
        return [_alert(r) for r in rows]

    def alerts(self) -> list[AlertRecord]:
        rows = self._query(f"SELECT {_ALERT_COLUMNS} FROM alerts ORDER BY id")
        return [_alert(r) for r in rows]

    def deliveries_of(self, alert_id: int) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT event, contact_point, attempts, delivered_ms, gave_up_ms, last_error "
            "FROM deliveries WHERE alert_id = ? ORDER BY id",
            (alert_id,),
        )
        keys = ("event", "contact_point", "attempts", "delivered_ms", "gave_up_ms", "last_error")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def delivery_counts(self) -> DeliveryCounts:
        (row,) = self._query(
            "SELECT count(*) FILTER (WHERE delivered_ms IS NULL AND gave_up_ms IS NULL), "
            "count(delivered_ms), count(gave_up_ms) FROM deliveries"
        )
        return DeliveryCounts(*row)

    # -- the delivery queue ---------------------------------------------------

    def claim_due(self, now_ms: int, lease_ms: int, limit: int = 20) -> list[Delivery]:
        """Deliveries due now, leased to the caller for ``lease_ms`` (a crashed sender's
        lease runs out and another process takes them: at least once)."""
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT id, alert_id, event, contact_point, body, attempts FROM deliveries "
                "WHERE delivered_ms IS NULL AND gave_up_ms IS NULL AND next_attempt_ms <= ? "
                "AND lease_until_ms <= ? ORDER BY id LIMIT ?",
                (now_ms, now_ms, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE deliveries SET lease_until_ms = ? WHERE id = ?",
                [(now_ms + lease_ms, r[0]) for r in rows],
            )
        return [Delivery(*r) for r in rows]

    def next_due_ms(self) -> int | None:
        (row,) = self._query(
            "SELECT min(max(next_attempt_ms, lease_until_ms)) FROM deliveries "
            "WHERE delivered_ms IS NULL AND gave_up_ms IS NULL"
        )
        return None if row[0] is None else int(row[0])

    def mark_delivered(self, delivery_id: int, now_ms: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET delivered_ms = ?, attempts = attempts + 1, "
                "last_error = NULL, lease_until_ms = 0 WHERE id = ?",
                (now_ms, delivery_id),
            )

    def mark_failed(
        self, delivery_id: int, now_ms: int, error: str, retry_at_ms: int | None
    ) -> None:
        """One failed attempt; ``retry_at_ms`` None: give up."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, "
                "lease_until_ms = 0, next_attempt_ms = coalesce(?, next_attempt_ms), "
                "gave_up_ms = CASE WHEN ? IS NULL THEN ? END WHERE id = ?",
                (error[:500], retry_at_ms, retry_at_ms, now_ms, delivery_id),
            )

    def prune(self, before_ms: int) -> int:
        """Drop resolved alerts (and their deliveries) resolved before ``before_ms``."""
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM deliveries WHERE alert_id IN (SELECT id FROM alerts "
                "WHERE state = 'resolved' AND resolved_ms < ?)",
                (before_ms,),
            )
            cursor = conn.execute(
                "DELETE FROM alerts WHERE state = 'resolved' AND resolved_ms < ?", (before_ms,)
            )
            return cursor.rowcount
