"""The gateway's durable state: chain heads per device and the forward queue (SQLite WAL).

Accepting a batch updates its device's chain head and enqueues its envelope in one
transaction, so a killed gateway neither loses a batch nor forwards one twice as new.
Forwarded envelopes are kept for ``keep_forwarded_hours`` for replay after a central loss.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from civicmesh.protocol import ChainHead
from civicmesh.timeutil import now_ms

SCHEMA = (
    "CREATE TABLE heads (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash BLOB NOT NULL)",
    "CREATE TABLE outgoing (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
    "body BLOB NOT NULL, created_ms INTEGER NOT NULL, forwarded_ms INTEGER)",
    "CREATE INDEX outgoing_pending ON outgoing (id) WHERE forwarded_ms IS NULL",
)


class GatewayBuffer:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            if self._db.execute("SELECT 1 FROM schema_migrations WHERE version = 1").fetchone():
                return
            self._db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                self._db.execute(statement)
            self._db.execute("INSERT INTO schema_migrations VALUES (1, 'initial', ?)", (now_ms(),))
            self._db.execute("COMMIT")

    def head(self, device_id: str) -> ChainHead | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, hash FROM heads WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else ChainHead(int(row[0]), bytes(row[1]))

    def accept(self, device_id: str, seq: int, digest: bytes, topic: str, body: bytes) -> None:
        """Advance the device's chain head and enqueue its envelope, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT (device_id) "
                    "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (device_id, seq, digest),
                )
                self._db.execute(
                    "INSERT INTO outgoing (topic, body, created_ms) VALUES (?, ?, ?)",
                    (topic, body, now_ms()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def enqueue(self, topic: str, body: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO outgoing (topic, body, created_ms) VALUES (?, ?, ?)",
                (topic, body, now_ms()),
            )

    def pending(self, limit: int) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, body FROM outgoing WHERE forwarded_ms IS NULL "
                "ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [(int(i), str(t), bytes(b)) for i, t, b in rows]

    def mark_forwarded(self, ids: list[int]) -> None:
        if not ids:
            return
        stamp = now_ms()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE outgoing SET forwarded_ms = ? WHERE id = ?", [(stamp, i) for i in ids]
            )
            self._db.execute("COMMIT")

    def prune(self, older_than_ms: int) -> int:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM outgoing WHERE forwarded_ms IS NOT NULL AND forwarded_ms < ?",
                (older_than_ms,),
            )
        return int(cursor.rowcount)

    def backlog(self) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT count(*) FROM outgoing WHERE forwarded_ms IS NULL"
            ).fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
